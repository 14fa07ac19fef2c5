"""The metrics on all images and on half-samples (latentmap.resampling) against independent references."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA

from latentmap import metrics, probes, resampling, stats


@pytest.fixture(scope="module")
def digits():
    """400 real handwritten digits (64 pixels) and a PCA map of them."""
    found = load_digits()
    rows = np.random.default_rng(0).choice(len(found.target), 400, replace=False)
    points = found.data[rows].astype(np.float32) + np.random.default_rng(1).normal(0, 0.01, (400, 64))  # no ties
    return points, PCA(2, random_state=0).fit_transform(points), found.target[rows]


def _references(points, coords, labels, k=5, folds=5, seed=3, distance="cosine") -> dict[str, np.ndarray]:
    return {**metrics.per_image_2d(points, coords, labels, k, folds, seed, distance),
            **metrics.per_image_hd(points, labels, k, folds, seed, distance),
            **probes.per_image(points, labels, folds, seed, distance, 10, 0.07)}


@pytest.mark.parametrize("width", [768, 64, 2])
def test_the_pass_s_distances_are_scikit_learn_s_bit_for_bit(width):
    """The distance pass's blocks equal ``sklearn.metrics.pairwise_distances`` exactly (not to a
    tolerance), duplicate rows (distance 0 after clamping) included, in every block position."""
    from sklearn.metrics import pairwise_distances

    points = np.random.default_rng(width).normal(size=(700, width)) * 3.0
    points[5] = points[400]  # a duplicate
    squared = np.einsum("ij,ij->i", points, points)
    for rows in (np.arange(0, 156), np.arange(390, 546), np.arange(650, 700)):
        found = resampling._pairwise(points, rows, squared)
        assert found.dtype == np.float64 and found.shape == (len(rows), 700)
        assert np.array_equal(found, pairwise_distances(points[rows], points)), rows[0]


def test_the_pass_returns_both_spaces_class_sums_and_evaluate_uses_them(digits, monkeypatch):
    """The pass's class sums are each row's distances @ the one-hot weights, in the embedding and
    in the map (scikit-learn's pairwise distances as the reference); with them, evaluate does not
    fall back to the direct silhouettes (a matrix product per half-sample, for too many classes
    only). A field order slip once sent the map's sums elsewhere and every run took the fallback."""
    from sklearn.metrics import pairwise_distances

    points, coords, labels = digits
    halves = resampling.halves(labels, len(labels), 3, 0)
    weights = resampling._class_weights(labels, halves.members, 10)
    high = points.astype(np.float64)
    space_h, space_l = resampling._pass(high, coords, 12, 12, weights, weights)
    np.testing.assert_allclose(space_h.class_sums, pairwise_distances(high) @ weights, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(space_l.class_sums, pairwise_distances(coords) @ weights, rtol=1e-9, atol=1e-9)
    assert space_l.ranks_of_extra is None and space_h.ranks_of_extra is None

    def direct(*args):
        raise AssertionError("the direct silhouette ran although the pass gave class sums")

    monkeypatch.setattr(resampling, "_direct_silhouette", direct)
    for refit in (None, lambda rows, fit: PCA(2, random_state=fit).fit_transform(points[rows])):
        resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="euclidean",
                            weighted_k=10, probe=False, refit=refit)


def test_nan_or_infinite_values_stop_the_pass_with_a_reason(digits):
    points, coords, labels = digits
    halves = resampling.halves(labels, len(labels), 3, 0)
    for bad_points, bad_coords in ((np.where(np.arange(400)[:, None] == 7, np.nan, points), coords),
                                   (points, np.where(np.arange(400)[:, None] == 9, np.inf, coords))):
        with pytest.raises(ValueError, match="NaN or infinite values"):
            resampling.evaluate(bad_points, [bad_coords], labels, halves, k=5, folds=5, seed=3, distance="euclidean",
                                weighted_k=10, probe=False)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_on_all_images_every_metric_equals_its_reference(digits, distance):
    points, coords, labels = digits
    halves = resampling.halves(labels, len(labels), 3, 0)
    found = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance=distance,
                                weighted_k=10)
    for name, reference in _references(points, coords, labels, distance=distance).items():
        np.testing.assert_allclose(found.per_image[name], reference, atol=1e-9, err_msg=name)
        assert found.values[name] == pytest.approx(reference.mean(), abs=1e-9)
    unit = metrics.embedding_space(points, distance)
    assert found.values["twonn_id"] == pytest.approx(stats.twonn_id(unit), rel=1e-9)


def test_a_half_sample_equals_the_metrics_of_its_own_images_when_the_lists_cover_them(digits, monkeypatch):
    """With neighbour lists as long as the data, every half-sample value is the reference metric
    computed from scratch on that half's images (its own folds, ranks and neighbours)."""
    points, coords, labels = digits
    monkeypatch.setattr(resampling, "_list_length", lambda k, folds, n: n - 1)
    halves = resampling.halves(labels, len(labels), 2, 5)
    found = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="cosine",
                                weighted_k=10, probe=False)
    for b, member in enumerate(halves.members):
        rows = np.flatnonzero(member)
        reference = _references(points[rows], coords[rows], labels[rows])
        for name in ("trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d", "silhouette_hd", "knn_acc_hd",
                     "knn_acc_weighted"):
            assert found.resampled[name][b] == pytest.approx(reference[name].mean(), abs=1e-9), name
        unit = metrics.embedding_space(points[rows], "cosine")
        assert found.resampled["twonn_id"][b] == pytest.approx(stats.twonn_id(unit), rel=1e-9)


def test_with_the_default_lists_half_sample_ranks_add_only_a_little_unbiased_noise(digits):
    """Beyond the embedding's neighbour list a half-sample's trustworthiness rank is its expected value:
    across 12 half-samples it differs from the exact value by noise with mean near 0 and a spread
    under 30% of the values' own. Continuity (ranks in the map) is counted exactly."""
    points, coords, labels = digits
    halves = resampling.halves(labels, len(labels), 12, 5)
    found = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="cosine",
                                weighted_k=10, probe=False)
    exact = {"trustworthiness": [], "continuity": []}
    for member in halves.members:
        rows = np.flatnonzero(member)
        high = metrics.embedding_space(points[rows], "cosine")
        exact["trustworthiness"].append(metrics.trustworthiness(high, coords[rows], 5))
        exact["continuity"].append(metrics.continuity(high, coords[rows], 5))
    for name, values in exact.items():
        errors = found.resampled[name] - np.array(values)
        spread = np.std(values, ddof=1)
        assert abs(errors.mean()) < 0.3 * spread and errors.std(ddof=1) < 0.3 * spread, (name, errors, spread)
    np.testing.assert_allclose(found.resampled["continuity"], exact["continuity"], atol=1e-9)


def test_refits_side_by_side_in_threads_give_the_same_predictions(digits, monkeypatch):
    """The half-sample refits in threads (forced here: from 0 numbers on) give exactly what one
    after another gives, half-sample by half-sample, in order, and leave the process's warnings
    filters as they were (catch_warnings inside the threads did not)."""
    import warnings

    from latentmap.machine import usable_cores

    points, _, labels = digits
    halves = resampling.halves(labels, len(labels), 8, 5)
    cores = usable_cores()
    found = {}
    for threshold in (10**12, 0):
        monkeypatch.setattr(probes, "PARALLEL_REFITS_FROM", threshold)
        workers = probes.refit_workers(len(points) // 2 * points.shape[1], 8)
        assert workers == (1 if threshold else min(8, cores))
        filters, shown = list(warnings.filters), warnings.showwarning
        found[threshold] = resampling.evaluate(points, None, labels, halves, k=5, folds=5, seed=3,
                                               distance="cosine", weighted_k=10)
        assert warnings.filters == filters and warnings.showwarning is shown
    alone, threaded = found[10**12], found[0]
    for name in ("probe_acc", "probe_balanced_acc"):
        assert np.array_equal(alone.resampled[name], threaded.resampled[name])
        assert np.isfinite(alone.resampled[name]).all()
    assert len(threaded.halved["probe_acc"]) == 8
    for (rows_a, right_a), (rows_b, right_b), member in zip(alone.halved["probe_acc"], threaded.halved["probe_acc"],
                                                            halves.members):
        assert np.array_equal(rows_a, rows_b) and np.array_equal(rows_a, np.flatnonzero(member))
        assert np.array_equal(right_a, right_b)


def test_the_probe_beside_the_other_metrics_gives_what_it_gives_alone(digits):
    """The probe runs in a thread beside the lists' metrics (evaluate): its values, half-samples
    and out-of-fold predictions are those of the probe run alone in this thread, the other metrics
    those of an evaluation without the probe, each metric listed in the same order, and the process's
    warnings filters are as they were."""
    import warnings

    from sklearn.decomposition import PCA

    points, _, labels = digits
    coords = PCA(2, random_state=0).fit_transform(points)
    halves = resampling.halves(labels, len(labels), 6, 4)
    options = dict(k=5, folds=5, seed=3, distance="cosine", weighted_k=10)
    filters = list(warnings.filters)
    beside = resampling.evaluate(points, [coords], labels, halves, **options)
    assert warnings.filters == filters
    without = resampling.evaluate(points, [coords], labels, halves, probe=False, **options)
    alone = resampling.Evaluation()
    with probes.one_thread():
        resampling._probe(alone, np.asarray(points, dtype=np.float64), labels, halves.members, 5, 3, 6)
    assert [name for name in beside.per_image if not name.startswith("probe")] == list(without.per_image)
    assert list(beside.per_image)[-3:] == ["probe_acc", "probe_balanced_acc", "twonn_log_ratio"]
    for name in without.values:
        assert beside.values[name] == without.values[name], name
        assert np.array_equal(beside.resampled[name], without.resampled[name], equal_nan=True), name
    for name in ("probe_acc", "probe_balanced_acc"):
        assert np.array_equal(beside.per_image[name], alone.per_image[name])
        assert np.array_equal(beside.resampled[name], alone.resampled[name])
    assert np.array_equal(beside.probe_predicted, alone.probe_predicted)
    assert np.array_equal(beside.probe_probabilities, alone.probe_probabilities)
    for (rows_a, right_a), (rows_b, right_b) in zip(beside.halved["probe_acc"], alone.halved["probe_acc"]):
        assert np.array_equal(rows_a, rows_b) and np.array_equal(right_a, right_b)
    assert beside.values["probe_acc"] > 0.9


def test_a_half_sample_refits_the_probe_at_the_full_samples_c(digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    points, _, labels = digits
    halves = resampling.halves(labels, len(labels), 1, 2)
    found = resampling.evaluate(points, None, labels, halves, k=5, folds=5, seed=3, distance="cosine", weighted_k=10)
    chosen = probes.linear_probe_fit(points, labels, 5, 3).inverse_penalty
    rows = np.flatnonzero(halves.members[0])
    x, y = points[rows].astype(np.float64), labels[rows]
    predicted = np.empty(len(rows), dtype=y.dtype)
    for train, test in metrics.folds_of(y, 5, 3, quiet=True).split(x, y):
        scaler = StandardScaler().fit(x[train])
        head = LogisticRegression(C=chosen, max_iter=500, tol=1e-3).fit(scaler.transform(x[train]), y[train])
        predicted[test] = head.predict(scaler.transform(x[test]))
    assert found.resampled["probe_acc"][0] == pytest.approx((predicted == y).mean(), abs=1e-12)
    balanced = np.mean([(predicted[y == c] == c).mean() for c in np.unique(y)])  # the half's own class counts
    assert found.resampled["probe_balanced_acc"][0] == pytest.approx(balanced, abs=1e-12)
    assert "trustworthiness" not in found.values  # no map: the embedding's own metrics only


def test_halves_are_stratified_seeded_and_identified_by_their_digest():
    labels = np.repeat(np.arange(3), [10, 7, 2])
    first = resampling.halves(labels, len(labels), 20, 4)
    assert first.members.shape == (20, 19)
    for c, size in ((0, 5), (1, 3), (2, 1)):
        assert (first.members[:, labels == c].sum(axis=1) == size).all()
    assert first.scale == pytest.approx(np.sqrt(9 / 10))
    again, other = resampling.halves(labels, len(labels), 20, 4), resampling.halves(labels, len(labels), 20, 5)
    assert again.digest == first.digest and other.digest != first.digest
    assert len({tuple(m) for m in first.members}) > 15  # the halves differ


def test_structured_data_scores_above_shuffled_labels_and_its_interval_says_so(digits):
    points, coords, labels = digits
    halves = resampling.halves(labels, len(labels), 10, 0)
    real = resampling.intervals(resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3,
                                                    distance="cosine", weighted_k=10, probe=False), halves, 0.95)
    shuffled = np.random.default_rng(0).permutation(labels)
    noise = resampling.intervals(resampling.evaluate(points, [coords], shuffled, halves, k=5, folds=5, seed=3,
                                                     distance="cosine", weighted_k=10, probe=False), halves, 0.95)
    assert real["knn_acc_hd"].lo > 0.8 and noise["knn_acc_hd"].hi < 0.3
    assert real["silhouette_hd"].lo > noise["silhouette_hd"].hi
    assert "exact binomial" in real["knn_acc_hd"].method and "map held fixed" in real["knn_acc_2d"].method


def test_a_neighbourhood_too_large_for_a_half_gives_no_interval_and_says_why(digits):
    """k = 30 of 100 images: allowed on all of them (k < N / 2), not on halves of 50: the value
    stands, the interval is none, and the method column says why."""
    points, coords, labels = digits
    rows = np.arange(100)
    halves = resampling.halves(labels[rows], 100, 5, 0)
    evaluation = resampling.evaluate(points[rows], [coords[rows]], labels[rows], halves, k=30, folds=2, seed=0,
                                     distance="cosine", weighted_k=10, probe=False)
    found = resampling.intervals(evaluation, halves, 0.95)
    assert np.isfinite(found["trustworthiness"].value) and np.isnan(found["trustworthiness"].lo)
    assert found["trustworthiness"].method == "none: fewer than 2 half-samples gave a value"


def test_with_too_many_classes_for_class_sums_the_silhouettes_are_scikit_learn_s_on_each_half():
    """150 classes x 31 samples exceed the class-sum matrix (4,096 columns): both silhouettes come
    from scikit-learn's own, on all images and on each half-sample (computed before the block that
    runs beside the probe, on every core)."""
    from sklearn.metrics import silhouette_samples

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(150), 12)
    points = (rng.normal(size=(1800, 32)) + 2 * rng.normal(size=(150, 32))[labels]).astype(np.float32)
    coords = points[:, :2].astype(np.float64)
    halves = resampling.halves(labels, 1800, 30, 0)
    found = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=0, distance="cosine",
                                probe=False)
    for b, member in enumerate([np.ones(1800, bool), *halves.members]):
        rows = np.flatnonzero(member)
        for name, space, metric in (("silhouette_2d", coords, "euclidean"),
                                    ("silhouette_hd", points.astype(np.float64), "cosine")):
            reference = silhouette_samples(space[rows], labels[rows], metric=metric).mean()
            value = found.values[name] if b == 0 else found.resampled[name][b - 1]
            assert value == pytest.approx(reference, abs=1e-9), (name, b)


def _refit_pca(points, distance="cosine"):
    """A run's metrics.refit_map for reducer=pca: PCA fitted again on a half-sample's images."""
    space = metrics.embedding_space(points, distance)
    return lambda rows, fit: PCA(2, random_state=fit).fit_transform(space[rows])


def test_repeated_fits_are_each_refitted_on_every_half_and_averaged(digits):
    """reducer.repeats=2 with refit: each half-sample is refitted once for each fit, told the fit
    (the runner seeds it reducer_seed + fit), and a half's map metric is the mean of the two fits'
    values, each what that fit's map alone gives (two one-map evaluations are the reference)."""
    points, coords, labels = digits
    space = metrics.embedding_space(points, "cosine")
    squeeze = np.array([1.0, 0.3])  # the second fit: another map (its second axis squeezed)
    calls = []

    def refit(rows, fit):
        calls.append((np.asarray(rows).tobytes(), fit))
        mapped = PCA(2, random_state=fit).fit_transform(space[rows])
        return mapped * squeeze if fit else mapped

    halves = resampling.halves(labels, len(labels), 6, 5)
    options = dict(k=5, folds=5, seed=3, distance="cosine", weighted_k=10, probe=False)
    both = resampling.evaluate(points, [coords, coords * squeeze], labels, halves, refit=refit, **options)
    assert sorted(fit for _, fit in calls) == [0] * 6 + [1] * 6  # each half once a fit
    assert {rows for rows, fit in calls if fit == 0} == {rows for rows, fit in calls if fit == 1}
    alone = [resampling.evaluate(points, [coords * (squeeze if fit else 1)], labels, halves,
                                 refit=lambda rows, _, fit=fit: refit(rows, fit), **options) for fit in (0, 1)]
    for name in ("trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d"):
        assert both.fits[name] == pytest.approx([alone[0].values[name], alone[1].values[name]], abs=1e-12)
        np.testing.assert_allclose(both.resampled[name], (alone[0].resampled[name] + alone[1].resampled[name]) / 2,
                                   rtol=0, atol=1e-12)
        assert not np.allclose(alone[0].resampled[name], alone[1].resampled[name])  # the fits do differ
    np.testing.assert_array_equal(both.resampled["knn_acc_hd"], alone[0].resampled["knn_acc_hd"])  # no map in it


def test_a_refitted_half_sample_equals_the_metrics_of_its_own_images_on_their_own_map(digits, monkeypatch):
    """With ``refit``, each half-sample's map metrics are scikit-learn's and latentmap's references on
    that half's images and a PCA fitted on them alone: exactly where the lists cover the half, and
    with the default lists exactly for continuity, the map's silhouette and k-NN accuracy, and within
    the half-sample rank noise (as for a fixed map) for trustworthiness. The full-sample values are
    the run's own map's, unchanged."""
    points, coords, labels = digits
    refit = _refit_pca(points)
    halves = resampling.halves(labels, len(labels), 8, 5)
    fixed = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="cosine",
                                weighted_k=10, probe=False)
    found = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="cosine",
                                weighted_k=10, probe=False, refit=refit)
    assert found.map_refitted and not fixed.map_refitted
    assert found.values == pytest.approx(fixed.values, abs=1e-12)
    references = []
    for member in halves.members:
        rows = np.flatnonzero(member)
        own = refit(rows, 0)
        references.append({**{name: v.mean() for name, v in metrics.per_image_2d(
            points[rows], own, labels[rows], 5, 5, 3, "cosine").items()}})
    for name in ("continuity", "silhouette_2d", "knn_acc_2d"):
        np.testing.assert_allclose(found.resampled[name], [r[name] for r in references], atol=1e-9, err_msg=name)
    exact = np.array([r["trustworthiness"] for r in references])
    errors = found.resampled["trustworthiness"] - exact
    spread = np.std(exact, ddof=1)
    assert abs(errors.mean()) < 0.3 * spread and errors.std(ddof=1) < 0.3 * spread, (errors, spread)
    assert not np.allclose(found.resampled["silhouette_2d"], fixed.resampled["silhouette_2d"])  # maps of their own

    monkeypatch.setattr(resampling, "_list_length", lambda k, folds, n: n - 1)
    covered = resampling.evaluate(points, [coords], labels, halves, k=5, folds=5, seed=3, distance="cosine",
                                  weighted_k=10, probe=False, refit=refit)
    np.testing.assert_allclose(covered.resampled["trustworthiness"], exact, atol=1e-9)


def test_an_unstable_pca_plane_widens_the_refitted_maps_interval_and_the_method_says_which():
    """Ten classes whose means lie on a sphere in 64 dimensions: which 2-D plane PCA picks depends on
    the images drawn, and the map's silhouette with it. Held fixed, its interval is as narrow as
    the images alone make it; refitted on each half, it is wider. Each interval's method names
    what it did with the map."""
    rng = np.random.default_rng(4)
    means = rng.normal(size=(10, 64))
    means *= 3.4 / np.linalg.norm(means, axis=1, keepdims=True)
    labels = np.arange(500) % 10
    points = means[labels] + rng.normal(size=(500, 64))
    coords = PCA(2, random_state=0).fit_transform(metrics.embedding_space(points, "cosine"))
    halves = resampling.halves(labels, 500, 30, 0)
    found = {}
    for name, refit in (("fixed", None), ("refit", _refit_pca(points))):
        found[name] = resampling.intervals(resampling.evaluate(points, [coords], labels, halves, k=10, folds=5,
                                                               seed=0, distance="cosine", probe=False, refit=refit),
                                           halves, 0.95)
    fixed, refitted = found["fixed"]["silhouette_2d"], found["refit"]["silhouette_2d"]
    assert fixed.value == pytest.approx(refitted.value, abs=1e-12)
    assert refitted.hi - refitted.lo > 1.3 * (fixed.hi - fixed.lo), (fixed, refitted)
    assert "the 2-D map held fixed" in fixed.method and "the 2-D map refitted on each half-sample" in refitted.method
    assert "held fixed" not in refitted.method
    assert "refitted" not in found["refit"]["silhouette_hd"].method


def test_a_refitted_map_s_neighbours_leave_each_point_out_even_among_its_duplicates():
    """Three points at one place and a spread of others: each point's map neighbours never hold
    itself, its duplicates come first (distance 0), and the rest follow nearest first."""
    rng = np.random.default_rng(5)
    coords = np.vstack([np.zeros((3, 2)), rng.normal(size=(20, 2)) + 5])
    found, distances = resampling._map_neighbours(coords, 4)
    assert found.shape == (23, 4) and (found != np.arange(23)[:, None]).all()
    for i in range(3):
        assert set(found[i, :2]) == {0, 1, 2} - {i} and (distances[i, :2] == 0).all()
    reference = np.linalg.norm(coords[:, None] - coords[None], axis=2)
    np.fill_diagonal(reference, np.inf)
    np.testing.assert_allclose(distances, np.sort(reference, axis=1)[:, :4], atol=1e-12)
