"""Large-N paths: metrics on a class-stratified sample, fit-on-a-sample reducers, t-SNE refusal."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from conftest import compose, mlflow_runs
from latentmap import metrics
from latentmap.errors import ConfigError
from latentmap.runner import SKLEARN_TSNE_MAX, check_reducer, metric_rows, reduce_to_2d, reducer_settings, run


def _reducer(name: str, *overrides: str):
    return reducer_settings(compose([f"reducer={name}", *overrides], "/tmp").reducer)


def test_metric_rows_are_a_class_stratified_sample_only_above_max_points():
    labels = np.repeat([0, 1, 2, 3], [400, 300, 200, 100])
    np.testing.assert_array_equal(metric_rows(None, labels, 1000, 0), np.arange(1000))
    np.testing.assert_array_equal(metric_rows(1000, labels, 1000, 0), np.arange(1000))
    rows = metric_rows(100, labels, 1000, 0)
    assert len(rows) == 100 and len(np.unique(rows)) == 100 and np.all(np.diff(rows) > 0)
    assert sorted(np.bincount(labels[rows]).tolist()) == [25, 25, 25, 25]  # balanced round-robin
    np.testing.assert_array_equal(rows, metric_rows(100, labels, 1000, 0))  # seeded
    with pytest.raises(ConfigError, match="metrics.max_points=0"):
        metric_rows(0, labels, 1000, 0)


def test_a_run_scores_the_sample_it_says(tmp_path):
    """metrics.max_points=120 on 300 digits: the logged scores are the metrics of those 120 rows."""
    cfg = compose(["model=pixels", "dataset.limit=300", "reducer=pca", "metrics.max_points=120",
                   "plots.enabled=false"], tmp_path)
    scores = run(cfg)
    client, runs = mlflow_runs(tmp_path)
    assert runs[0].data.tags["metrics_points"] == "120"
    folder = client.download_artifacts(runs[0].info.run_id, "arrays")
    embeddings, coords, labels = (np.load(f"{folder}/{name}.npy") for name in ("embeddings", "coords", "labels"))
    rows = metric_rows(120, labels, 300, 42)
    expected = metrics.score(embeddings[rows], coords[rows], labels[rows], k=10, folds=5, seed=42)
    assert scores == pytest.approx(expected, abs=1e-12)


def test_fit_sample_fits_on_the_sample_and_transforms_all():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(500, 20)) * np.linspace(5, 1, 20)
    labels = rng.integers(0, 5, 500)
    settings = _reducer("pca", "reducer.fit_sample=100")
    coords = reduce_to_2d(settings, points, seed=42, labels=labels)
    from latentmap.data import balanced_order

    rows = np.sort(balanced_order(labels, 500, 42)[:100])
    expected = PCA(2, random_state=42).fit(points[rows]).transform(points)
    np.testing.assert_allclose(coords, expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(coords, PCA(2, random_state=42).fit_transform(points), atol=1e-3)


def test_scikit_learn_tsne_is_refused_at_scale_with_the_way_out():
    with pytest.raises(ConfigError, match=rf"reducer=tsne .*N={SKLEARN_TSNE_MAX + 1}.*reducer=opentsne"):
        check_reducer(_reducer("tsne"), SKLEARN_TSNE_MAX + 1)
    check_reducer(_reducer("tsne"), SKLEARN_TSNE_MAX)  # at the limit: allowed
    with pytest.raises(ConfigError, match="reducer.fit_sample=1000: sklearn.manifold.TSNE cannot place points"):
        check_reducer(_reducer("tsne", "reducer.fit_sample=1000"), 5000)
    check_reducer(_reducer("opentsne", "reducer.fit_sample=1000"), 100_000)  # openTSNE can transform
    with pytest.raises(ConfigError, match="reducer.fit_sample=-5"):
        _reducer("umap", "reducer.fit_sample=-5")
