"""Metrics: the blocked trustworthiness and continuity equal scikit-learn's, whatever the block size;
the rows they are computed on."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sklearn_trustworthiness

from latentmap import metrics
from latentmap.errors import ConfigError


@pytest.mark.parametrize("n,d,k", [(300, 32, 5), (1200, 768, 10), (901, 8, 30)])
def test_trustworthiness_and_continuity_equal_sklearn(n, d, k):
    rng = np.random.default_rng(n)
    embeddings = rng.normal(size=(n, d))
    coords = embeddings[:, :2] + 0.7 * rng.normal(size=(n, 2))
    assert metrics.trustworthiness(embeddings, coords, k) == pytest.approx(
        sklearn_trustworthiness(embeddings, coords, n_neighbors=k), abs=1e-12)
    assert metrics.continuity(embeddings, coords, k) == pytest.approx(
        sklearn_trustworthiness(coords, embeddings, n_neighbors=k), abs=1e-12)


def test_block_size_does_not_change_the_value():
    rng = np.random.default_rng(1)
    embeddings, coords = rng.normal(size=(400, 16)), rng.normal(size=(400, 2))
    values = {metrics.trustworthiness(embeddings, coords, 7, block_bytes=b) for b in (1, 10_000, 1 << 30)}
    assert len(values) == 1  # one row per block, a few rows, all rows at once


def test_float32_input_matches_sklearn_on_float64():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(500, 64)).astype(np.float32)
    coords = rng.normal(size=(500, 2)).astype(np.float32)
    reference = sklearn_trustworthiness(embeddings.astype(np.float64), coords.astype(np.float64), n_neighbors=10)
    assert metrics.trustworthiness(embeddings, coords, 10) == pytest.approx(reference, abs=1e-12)


def test_k_too_large_is_refused():
    with pytest.raises(ValueError, match="must be < N/2"):
        metrics.trustworthiness(np.zeros((10, 3)), np.zeros((10, 2)), 5)


def test_scored_rows_are_a_class_stratified_sample_only_above_max_points():
    labels = np.repeat([0, 1, 2, 3], [400, 300, 200, 100])
    np.testing.assert_array_equal(metrics.scored_rows(None, labels, 1000, 0), np.arange(1000))
    np.testing.assert_array_equal(metrics.scored_rows(1000, labels, 1000, 0), np.arange(1000))
    rows = metrics.scored_rows(100, labels, 1000, 0)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    assert sorted(np.bincount(labels[rows]).tolist()) == [25, 25, 25, 25]  # balanced round-robin
    np.testing.assert_array_equal(rows, metrics.scored_rows(100, labels, 1000, 0))  # seeded
    with pytest.raises(ConfigError, match="metrics.max_points=0"):
        metrics.scored_rows(0, labels, 1000, 0)
    with pytest.raises(ConfigError, match="metrics.max_points='abc'"):
        metrics.scored_rows("abc", labels, 1000, 0)


def test_per_image_scores_average_to_each_metric_and_match_scikit_learn():
    """Trustworthiness/continuity per point average to scikit-learn's; silhouette per image is
    silhouette_samples; k-NN per image is a plain scikit-learn out-of-fold prediction on the same folds."""
    from sklearn.metrics import silhouette_samples
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 40)
    embeddings = rng.normal(size=(160, 24)) + labels[:, None] * 0.8
    coords = embeddings[:, :2] + 0.5 * rng.normal(size=(160, 2))
    scores = metrics.per_image(embeddings, coords, labels, k=7, folds=5, seed=3, distance="euclidean")
    assert all(values.shape == (160,) for values in scores.values())
    assert scores["trustworthiness"].mean() == pytest.approx(
        sklearn_trustworthiness(embeddings, coords, n_neighbors=7), abs=1e-9)
    assert scores["continuity"].mean() == pytest.approx(
        sklearn_trustworthiness(coords, embeddings, n_neighbors=7), abs=1e-9)
    np.testing.assert_allclose(scores["silhouette_hd"], silhouette_samples(embeddings, labels), atol=1e-12)
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    predicted = cross_val_predict(KNeighborsClassifier(7), embeddings, labels, cv=folds)
    np.testing.assert_array_equal(scores["knn_acc_hd"], predicted == labels)
    assert metrics.score(embeddings, coords, labels, k=7, folds=5, seed=3, distance="euclidean") == {
        name: pytest.approx(values.mean(), abs=1e-15) for name, values in scores.items()}


def test_one_geometry_for_every_computation_on_the_embeddings():
    """cosine: every embedding-side neighbour set (trustworthiness's ranks, the k-NN classifier, the
    neighbours and outliers) is the cosine one, and each metric equals its scikit-learn counterpart on
    the L2-normalised embeddings; euclidean: each equals its euclidean counterpart on the embeddings."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    from latentmap import neighbours

    rng = np.random.default_rng(9)
    labels = np.repeat(np.arange(3), 50)
    # Norms that vary a lot: cosine and euclidean neighbours then differ.
    embeddings = (rng.normal(size=(150, 16)) + labels[:, None]) * rng.uniform(0.2, 5.0, (150, 1))
    coords = rng.normal(size=(150, 2))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    for distance, space in (("cosine", unit), ("euclidean", embeddings)):
        scores = metrics.score(embeddings, coords, labels, k=6, folds=5, seed=1, distance=distance)
        assert scores["trustworthiness"] == pytest.approx(sklearn_trustworthiness(space, coords, n_neighbors=6),
                                                          abs=1e-9)
        assert scores["continuity"] == pytest.approx(sklearn_trustworthiness(coords, space, n_neighbors=6), abs=1e-9)
        assert scores["silhouette_hd"] == pytest.approx(silhouette_score(embeddings, labels, metric=distance),
                                                        abs=1e-9)
        predicted = cross_val_predict(KNeighborsClassifier(6), space, labels,
                                      cv=StratifiedKFold(5, shuffle=True, random_state=1))
        assert scores["knn_acc_hd"] == pytest.approx((predicted == labels).mean(), abs=1e-12)
        reference = NearestNeighbors(n_neighbors=6).fit(space).kneighbors(return_distance=False)
        found, _ = neighbours.nearest(embeddings, 6, metric=distance)
        assert [set(row) for row in found] == [set(row) for row in reference]
    cosine_sets = NearestNeighbors(n_neighbors=6, metric="cosine").fit(embeddings).kneighbors(return_distance=False)
    euclidean_sets = NearestNeighbors(n_neighbors=6).fit(embeddings).kneighbors(return_distance=False)
    assert [set(r) for r in cosine_sets] != [set(r) for r in euclidean_sets]  # the geometry matters here
    with pytest.raises(ConfigError, match="metrics.distance='manhattan' is not a geometry"):
        metrics.embedding_space(embeddings, "manhattan")


def test_classes_too_small_for_half_samples_are_refused_in_one_line_before_the_run():
    """With 3 images a class, every class of a half-sample holds 1 image and cross-validation within
    it cannot be stratified (scikit-learn raised inside the run, a traceback and a FAILED run): the
    check refuses first, naming the fix. Without intervals, or with one class of 4, the metrics run."""
    from latentmap import resampling

    labels = np.repeat(np.arange(10), 3)
    with pytest.raises(ConfigError, match=r"every class has at most 3 images.* \(add images, or raise dataset.limit "
                                          r"where one is set\), or metrics.bootstrap=0") as error:
        metrics.check(len(labels), labels, 5, 5, halves=5)
    assert "\n" not in str(error.value)
    metrics.check(len(labels), labels, 5, 5, halves=0)
    with pytest.raises(ConfigError, match=r"raise metrics.max_points\), or metrics.bootstrap=0"):  # the cap named
        metrics.check(len(labels), labels, 5, 5, capped_by="metrics.max_points", halves=5)
    points = np.random.default_rng(0).normal(size=(31, 8)) + np.repeat(np.eye(8)[:, :8], 4, axis=0)[:31]
    bigger = np.append(labels, 0)  # class 0 has 4 images
    metrics.check(len(bigger), bigger, 5, 5, halves=5)
    found = resampling.evaluate(points, None, bigger, resampling.halves(bigger, 31, 5, 0), k=5, folds=5, seed=0,
                                distance="euclidean", probe=False)
    assert found.resampled["knn_acc_hd"].shape == (5,)
    # and the check is the one the run makes: the same data fail without it
    with pytest.raises(ValueError, match="n_splits=2 cannot be greater"):
        resampling.evaluate(points[:30], None, labels, resampling.halves(labels, 30, 5, 0), k=5, folds=5, seed=0,
                            distance="euclidean", probe=False)


def test_a_class_of_one_image_is_named():
    """"a class has only 1 image" did not say which, and a user with dozens of folders had to count."""
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 0, 1, 3])
    with pytest.raises(ConfigError, match=r"^a class has only 1 image \('bird'\); k-NN accuracy needs at least 2"):
        metrics.check(9, labels[:9], 2, 2, names=["cat", "dog", "bird", "frog"])
    with pytest.raises(ConfigError, match=r"^2 classes have only 1 image \('bird', 'frog'\); k-NN accuracy"):
        metrics.check(len(labels), labels, 2, 2, names=["cat", "dog", "bird", "frog"])
    with pytest.raises(ConfigError, match=r"^2 classes have only 1 image \(2, 3\)"):  # no names: their numbers
        metrics.check(len(labels), labels, 2, 2)


def test_rows_the_same_up_to_float_rounding_are_one_point():
    """Grey images' unit rows (model=pixels model.size=1) differed only in float32 rounding and were
    mapped and scored as if they spread (trustworthiness 1.000 of a map of one point)."""
    rng = np.random.default_rng(0)
    row = rng.normal(size=8)
    rounded = (row / np.linalg.norm(row) + rng.normal(scale=1e-8, size=(50, 8))).astype(np.float32)
    with pytest.raises(ConfigError, match="is the same point"):
        metrics.check_spread(rounded, "pixels · embed")
    spread = rounded.copy()
    spread[7, 3] += 1e-3  # one image a little different: mapped as usual
    metrics.check_spread(spread, "pixels · embed")
    # coordinate by coordinate: one large constant coordinate does not hide the others' spread
    biased = np.column_stack([np.full(50, 1e6), rng.normal(size=(50, 3))]).astype(np.float32)
    metrics.check_spread(biased, "with a bias coordinate")
    with_nan = spread.copy()
    with_nan[0, 0] = np.nan  # not a question of spread (fp16 overflow): passed on, as before
    metrics.check_spread(with_nan, "fp16")
