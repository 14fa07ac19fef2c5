"""latentmap.calibration: the intervals' coverage on draws from a Gaussian mixture whose truth is
known (the suite's calibration check), and the summary that turns replicates into coverage and
rejection rates."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import calibration


def test_a_draw_is_seeded_and_its_classes_sit_at_the_mixture_s_separation():
    classes, dims, separation, ratio = calibration.MIXTURES["mixture-hard"]
    assert ratio == 1.0
    points, labels = calibration.draw("mixture-hard", 3000, seed=4)
    again, _ = calibration.draw("mixture-hard", 3000, seed=4)
    other, _ = calibration.draw("mixture-hard", 3000, seed=5)
    assert points.shape == (3000, dims) and (np.bincount(labels) == 3000 // classes).all()  # balanced
    np.testing.assert_array_equal(points, again)
    assert not np.array_equal(points, other)
    means = np.stack([points[labels == c].mean(axis=0) for c in range(classes)])
    # each class mean lies at the separation from the origin, up to the sampling error of 300 points
    # (a standard error of about 0.06, and a bias of about +0.03 from the noise's own norm)
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), separation, atol=0.25)


def test_an_imbalanced_mixture_and_a_run_s_own_images_are_drawn_in_their_class_shares(tmp_path):
    """The long-tailed mixture: each class 0.7 times the one before, the same counts in every draw.
    A features population (a run's arrays folder): N of its rows without replacement, each class in
    its share, the rows scaled so that a dimension's variance within a class is 1 on average."""
    points, labels = calibration.draw("mixture-imbalanced", 500, seed=2)
    counts = np.bincount(labels)
    assert counts.sum() == 500 and counts.tolist() == calibration.MIXTURES["mixture-imbalanced"].counts(500).tolist()
    shares = 0.7 ** np.arange(10) / np.sum(0.7 ** np.arange(10))
    assert np.abs(counts - 500 * shares).max() < 1 and counts[-1] == 6
    assert np.bincount(calibration.draw("mixture-many", 500, seed=2)[1]).tolist() == [10] * 50

    rng = np.random.default_rng(0)
    population = rng.normal(size=(1000, 8)) * 3.0 + 5.0
    names = np.repeat([7, 3, 9], [600, 300, 100])  # any label values: they become 0..C-1 in sorted order
    np.save(tmp_path / "embeddings.npy", population.astype(np.float32))
    np.save(tmp_path / "labels.npy", names)
    scaled, classes = calibration.features(str(tmp_path))
    within = np.mean([population[names == c].astype(np.float32).var(axis=0).mean() for c in (3, 7, 9)])
    np.testing.assert_allclose(scaled, population.astype(np.float32) / np.sqrt(within), rtol=1e-5)
    drawn, drawn_labels = calibration.draw(f"features:{tmp_path}", 200, seed=1)
    assert np.bincount(drawn_labels).tolist() == [60, 120, 20]  # 30%, 60%, 10% of 200
    rows = [int(np.flatnonzero((scaled == row).all(axis=1))[0]) for row in drawn]
    assert len(set(rows)) == 200 and (classes[rows] == drawn_labels).all()  # population rows, none twice
    assert not np.array_equal(drawn, calibration.draw(f"features:{tmp_path}", 200, seed=2)[0])
    with pytest.raises(ValueError, match="a draw of 2000 images from a population of 1000"):
        calibration.draw(f"features:{tmp_path}", 2000, seed=1)


def test_the_summary_counts_coverage_and_rejections_as_a_formula_does():
    """Five replicates whose truth (the mean of the estimates) is 0.5: the intervals that contain it
    count, and the paired p-values below 0.05 count as rejections, each with its Monte Carlo error."""
    values = [0.4, 0.45, 0.5, 0.55, 0.6]
    rows = [{"m": v, "m_lo": v - w, "m_hi": v + w, "null_m_p": p}
            for v, w, p in zip(values, [0.05, 0.1, 0.01, 0.1, 0.2], [0.01, 0.2, 0.5, 0.04, 0.9])]
    (entry,) = calibration.summarise(rows)
    assert entry["metric"] == "m" and entry["R"] == 5 and entry["truth"] == pytest.approx(0.5)
    assert entry["coverage_after"] == pytest.approx(4 / 5)  # 0.4 +- 0.05 misses 0.5
    assert entry["coverage_after_mc"] == pytest.approx(np.sqrt(0.8 * 0.2 / 5))
    assert entry["null_reject_after"] == pytest.approx(2 / 5)
    spread = np.std(values, ddof=1)
    assert entry["width_ratio_after"] == pytest.approx(np.mean([0.1, 0.2, 0.02, 0.2, 0.4]) / (3.92 * spread))


def test_intervals_cover_on_draws_from_a_known_mixture():
    """The suite's calibration check: 40 seeded draws of 300 images from the hard Gaussian mixture,
    each scored as a default ``reducer=pca`` run scores it (PCA fitted on the draw, and again on
    each half-sample: metrics.refit_map). Every metric's 95% interval covers the truth (the mean of
    the 40 estimates) at least 90% of the time (measured 0.95-1.00; the published table, R = 300,
    both mixtures, the paired test: scripts/bench.py --only calibration)."""
    settings = calibration.Settings(n=300, halves=20, paired=False, beside=False)
    assert settings.map == "pca" and settings.refit_map  # what a run does by default
    rows = calibration.run("mixture-hard", 40, settings, seed=7, jobs=1)
    coverage = {row["metric"]: row["coverage_after"] for row in rows}
    assert set(coverage) >= {"trustworthiness", "continuity", "silhouette_hd", "silhouette_2d", "knn_acc_hd",
                             "knn_acc_2d", "knn_acc_weighted", "probe_acc", "probe_balanced_acc", "twonn_id"}
    assert min(coverage.values()) >= 0.90, coverage
    assert not any("coverage_fixed" in row or "coverage_before" in row for row in rows)  # the run's alone


def test_intervals_of_a_map_held_fixed_cover_what_they_claim():
    """A t-SNE or UMAP run of more than 2,000 images holds its map fixed (metrics.refit_map): its map
    metrics' intervals claim to cover the choice of images for that map. 30 draws of 300 images, the map held at the
    population's projection (one map for every draw): every metric covers at least 90% of the time."""
    settings = calibration.Settings(n=300, halves=20, map="fixed", paired=False, beside=False)
    rows = calibration.run("mixture-hard", 30, settings, seed=7, jobs=1)
    coverage = {row["metric"]: row["coverage_after"] for row in rows}
    assert {"trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d"} <= set(coverage)
    assert min(coverage.values()) >= 0.90, coverage


def test_a_draw_scores_its_map_metrics_refitted_as_a_pca_run_does_and_held_fixed_beside_them():
    """With the map refitted per draw (a run's reducer=pca), the intervals checked are the run's (the
    map refitted on each half-sample) and, beside them on the same draw, the map's metrics with the
    map held fixed: the table's "held fixed" columns. The embedding's metrics have one interval."""
    row = calibration.replicate("mixture-hard", calibration.Settings(n=200, halves=6), seed=1)
    for name in ("trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d"):
        assert {f"{name}_fixed_lo", f"{name}_fixed_hi", f"null_{name}_p_fixed"} <= set(row), name
        assert row[f"{name}_fixed_lo"] <= row[name] <= row[f"{name}_fixed_hi"]
    assert (row["silhouette_2d_lo"], row["silhouette_2d_hi"]) != (row["silhouette_2d_fixed_lo"],
                                                                  row["silhouette_2d_fixed_hi"])
    assert "knn_acc_hd_fixed_lo" not in row and "null_knn_acc_hd_p_fixed" not in row
    fixed = calibration.replicate("mixture-hard", calibration.Settings(n=200, halves=6, map="fixed"), seed=1)
    assert not any(key.endswith(("_fixed_lo", "_p_fixed")) for key in fixed)


def test_a_draw_with_a_umap_map_fits_it_as_a_run_with_reducer_umap_does():
    """``map="umap"`` (the calibration of UMAP runs): each draw's map is the one ``run.py reducer=umap
    reducer_seed=<seed>`` fits on that draw's embedding space, and the scores are that map's
    (trustworthiness against scikit-learn's on the same map); held fixed, no half refits it."""
    from hydra import compose, initialize_config_dir
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score

    from latentmap import metrics, reduce, resampling
    from latentmap.config import CONF_DIR

    points, labels = calibration.draw("mixture-hard", 200, seed=3)
    settings = calibration.Settings(n=200, halves=4, map="umap", refit_map=False)
    space = metrics.embedding_space(points, "cosine")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["reducer=umap", "reducer_seed=3"])
    run_map = reduce.maps(cfg.reducer, space, int(cfg.reducer_seed), labels)[0]
    np.testing.assert_array_equal(calibration._fit_map(space, settings, 3), run_map)
    halves = resampling.halves(labels, 200, settings.halves, 3)
    evaluation, found = calibration._score(points, labels, settings, 3, halves, refit_map=False)
    assert found["trustworthiness"].value == pytest.approx(trustworthiness(space, run_map, n_neighbors=10), abs=1e-9)
    assert not evaluation.map_refitted
    refitted, _ = calibration._score(points, labels, settings, 3, halves, refit_map=True)
    assert refitted.map_refitted and refitted.values["trustworthiness"] == evaluation.values["trustworthiness"]
    # Each half's map is the run's reducer fitted again on that half alone: half 0's silhouette is
    # scikit-learn's on UMAP fitted to its rows, as the run's refit fits it.
    rows = np.flatnonzero(halves.members[0])
    half_map = reduce.to_2d(reduce.build(cfg.reducer), space[rows], int(cfg.reducer_seed))
    assert refitted.resampled["silhouette_2d"][0] == pytest.approx(silhouette_score(half_map, labels[rows]), abs=1e-9)
    assert not np.array_equal(refitted.resampled["silhouette_2d"], evaluation.resampled["silhouette_2d"])
