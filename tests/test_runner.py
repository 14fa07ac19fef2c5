"""One run end to end, in process: what it logs, that its metrics are right, and every user error."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from latentmap import data, metrics, resampling
from latentmap.audit import CLUSTER_METRICS
from latentmap.errors import ConfigError
from latentmap.runner import run

from helpers import CONF, cache_entries, compose, extraction, mlflow_runs, run_script, write_class_images

SIX_METRICS = {"silhouette_hd", "silhouette_2d", "trustworthiness", "continuity", "knn_acc_hd", "knn_acc_2d"}
READOUTS = {"knn_acc_weighted", "probe_acc", "probe_balanced_acc"}
GEOMETRY = {"twonn_id", "rankme"}


def _only_run(output_dir: Path):
    client, runs = mlflow_runs(output_dir)
    assert len(runs) == 1
    return client, runs[0]


def _artifacts(client, run) -> Path:
    return Path(client.download_artifacts(run.info.run_id, ""))


def _reference_continuity(high: np.ndarray, low: np.ndarray, k: int) -> float:
    """Continuity from its definition (Venna & Kaski 2001), written independently of the package."""
    from scipy.spatial.distance import cdist

    n = len(high)
    d_high, d_low = cdist(high, high), cdist(low, low)
    np.fill_diagonal(d_high, np.inf)
    np.fill_diagonal(d_low, np.inf)
    rank_low = np.argsort(np.argsort(d_low, axis=1), axis=1) + 1  # 1 = nearest
    penalty = 0.0
    for i in range(n):
        high_nn = set(np.argsort(d_high[i])[:k])
        low_nn = set(np.argsort(d_low[i])[:k])
        penalty += sum(rank_low[i, j] - k for j in high_nn - low_nn)
    return 1.0 - 2.0 / (n * k * (2 * n - 3 * k - 1)) * penalty


@pytest.fixture(scope="module")
def one_run(tiny_vit, class_folder, tmp_path_factory):
    """One default-everything run of a tiny ViT on the 32 class images (PCA, k = 5), read back from
    MLflow: (scores, client, run, artifact folder, output folder, the unit embeddings and the map)."""
    tmp_path = tmp_path_factory.mktemp("one-run")
    cfg = compose(["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={class_folder}",
                   "reducer=pca", "metrics.k=5", "plots.max_thumbnails=10"], tmp_path)
    scores = run(cfg)
    client, logged = _only_run(tmp_path)
    return scores, client, logged, _artifacts(client, logged), tmp_path


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {name: np.load(root / f"arrays/{name}.npy", allow_pickle=False)
            for name in ("embeddings", "coords", "labels", "indices")}


def test_the_run_logs_every_metric_with_its_bounds_and_stage_times(one_run):
    _, _, logged, _, _ = one_run
    assert logged.info.status == "FINISHED"
    # RankMe is reported without an interval (metrics.csv's method column says why).
    bounds = {f"{name}_{side}" for name in SIX_METRICS | READOUTS | {"twonn_id"} for side in ("lo", "hi")}
    stages = {f"time_{stage}_s"
              for stage in ("extract", "reduce", "metrics", "neighbours", "audit", "arrays", "plots", "map")}
    audit = {"n_label_issues", "n_duplicates_exact", "n_duplicates_near", "n_clusters_hdbscan", *CLUSTER_METRICS}
    # an agreement's interval only where the half-samples spread (a cluster of everything has none)
    audit_bounds = {f"{name}_{side}" for name in CLUSTER_METRICS for side in ("lo", "hi")}
    # n_skipped only when skipped; neighbour_recall only when the neighbours are approximate
    assert set(logged.data.metrics) - audit_bounds == SIX_METRICS | READOUTS | GEOMETRY | bounds | stages | audit
    assert all(logged.data.metrics[name] >= 0 for name in stages) and logged.data.tags["neighbour_search"] == "exact"


def test_the_run_is_named_tagged_and_described_as_mlflow_shows_it(one_run, tiny_vit, class_folder):
    """A descriptive name, the dataset input (its fingerprint as digest), the standard source tags,
    the params a user filters on, the tags, and the experiment marked as model development."""
    _, client, logged, _, _ = one_run
    assert logged.data.tags["cache"] == "miss"
    assert logged.data.params["model.name"] == str(tiny_vit)
    assert logged.data.params["reducer._target_"] == "sklearn.decomposition.PCA"
    assert "version.torch" in logged.data.tags and "git_commit" in logged.data.tags
    assert logged.info.run_name == f"{tiny_vit.name} · embed · PCA"
    (dataset_input,) = logged.inputs.dataset_inputs
    assert dataset_input.dataset.name == class_folder.name
    assert logged.data.tags["dataset_fingerprint"].startswith(dataset_input.dataset.digest)
    assert json.loads(dataset_input.dataset.profile) == {"images": 32, "classes": 4}
    assert logged.data.tags["mlflow.source.type"] == "LOCAL" and logged.data.tags["mlflow.source.name"]
    if logged.data.tags["git_commit"] != "unknown":
        assert logged.data.tags["git_commit"].startswith(logged.data.tags["mlflow.source.git.commit"])
    assert client.get_experiment(logged.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert {k for k in logged.data.tags if not k.startswith(("mlflow.", "version."))} == {
        "cache", "cache_dir", "cache_key", "dataset_fingerprint", "embedding_dim", "feature", "git_commit", "host",
        "latentmap.config_hash", "halves", "halves_digest", "halves_scale",
        "layer_index", "map_refit", "metrics_points", "model", "n_images", "neighbour_search", "num_layers", "pid",
        "reducer", "relative_depth"}
    assert logged.data.tags["map_refit"] == "true"  # a PCA map: refitted on each half-sample by default


def test_the_artifacts_are_stored_once_and_are_the_files_users_read(one_run):
    _, _, _, root, tmp_path = one_run
    # Stored once: in the run's artifact folder, not also in the job's output folder.
    assert not list((tmp_path / "runs").rglob("map.html")) and (root / "map.html").is_file()
    assert (root / "map.html").stat().st_size > 1_000_000  # Plotly's JavaScript is embedded
    for plot in ("samples", "scatter", "thumbnails", "centroids", "centroid_distances_2d", "centroid_distances_hd",
                 "neighbours", "outliers"):
        with Image.open(root / "plots" / f"{plot}.png") as image:
            assert image.size[0] > 300 and image.size[1] > 200
    csv = (root / "tables/centroid_distances_hd.csv").read_text().splitlines()
    assert csv[0].split(",")[1:] == ["blue", "green", "red", "yellow"] and len(csv) == 5
    # The whole artifact list, as it was before the house was rebuilt (issue 11): users' scripts read these;
    # and the data audit's (issue 24), its grids only when it found something to show.
    import pandas as pd

    shown = [f"plots/{name}.png" for name in ("duplicates", "label_issues")
             if len(pd.read_csv(root / "tables" / f"{name}.csv"))]
    audit = [f"arrays/audit_{name}.npy" for name in ("cluster_hdbscan", "cluster_kmeans", "duplicate", "label_issue",
                                                      "probe_correct", "suggested")]
    audit += ["plots/confusion.png", *shown] + [f"tables/{name}.csv" for name in
                                                 ("clusters", "confusion", "duplicates", "label_issues", "per_class")]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(audit + [
        "arrays/classes.json", "arrays/coords.npy", "arrays/embeddings.npy", "arrays/indices.npy",
        "arrays/labels.npy", "arrays/neighbour_disagreement.npy", "arrays/outlier_score.npy", "config.yaml",
        "map.html", "metrics.json", "plots/centroid_distances_2d.png", "plots/centroid_distances_hd.png",
        "plots/centroids.png", "plots/neighbours.png", "plots/outliers.png", "plots/samples.png",
        "plots/scatter.png", "plots/thumbnails.png", "tables/centroid_distances_2d.csv",
        "tables/centroid_distances_hd.csv", "tables/halves.csv", "tables/metrics.csv",
        "tables/per_image.csv"])  # metrics and per_image: issue 13; halves: issue 21


def test_the_arrays_hold_the_images_in_order_with_their_labels(one_run):
    _, _, _, root, _ = one_run
    arrays = _arrays(root)
    assert arrays["embeddings"].shape == (32, 32) and arrays["embeddings"].dtype == np.float32
    assert arrays["coords"].shape == (32, 2)
    assert json.loads((root / "arrays/classes.json").read_text()) == ["blue", "green", "red", "yellow"]
    np.testing.assert_array_equal(arrays["indices"], np.arange(32))
    np.testing.assert_array_equal(np.bincount(arrays["labels"]), [8, 8, 8, 8])


def test_the_logged_metrics_equal_scikit_learn_and_the_formulas_on_the_logged_arrays(one_run):
    from sklearn.decomposition import PCA
    from sklearn.manifold import trustworthiness
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import NearestNeighbors

    scores, _, logged, root, _ = one_run
    arrays = _arrays(root)
    embeddings, coords, labels = arrays["embeddings"], arrays["coords"], arrays["labels"]
    # The default geometry is cosine: the reducer and the neighbour ranks see the L2-normalised embeddings.
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(coords, PCA(2, random_state=42).fit_transform(unit), atol=1e-4)
    got = logged.data.metrics
    assert logged.data.params["metrics.distance"] == "cosine"
    # latentmap computes neighbourhood ranks in float64; the references get float64 copies.
    high, low = unit.astype(np.float64), coords.astype(np.float64)
    assert got["trustworthiness"] == pytest.approx(trustworthiness(high, low, n_neighbors=5), abs=1e-9)
    assert got["continuity"] == pytest.approx(_reference_continuity(high, low, 5), abs=1e-9)
    assert got["silhouette_hd"] == pytest.approx(silhouette_score(embeddings.astype(np.float64), labels,
                                                                  metric="cosine"), abs=1e-9)
    assert got["silhouette_2d"] == pytest.approx(silhouette_score(low, labels), abs=1e-9)
    assert scores == pytest.approx({name: got[name] for name in SIX_METRICS | READOUTS | GEOMETRY})
    # Label-free geometry on the unit embeddings: TwoNN's MLE and the entropy rank, from their formulas.
    distances, _ = NearestNeighbors(n_neighbors=3).fit(high).kneighbors(high)
    assert got["twonn_id"] == pytest.approx(1 / np.log(distances[:, 2] / distances[:, 1]).mean(), rel=1e-9)
    singular = np.linalg.svd(high, compute_uv=False)
    shares = singular / singular.sum()
    assert got["rankme"] == pytest.approx(np.exp(-(shares * np.log(shares)).sum()), rel=1e-9)


def test_every_metric_is_the_mean_of_its_per_image_scores_inside_its_interval(one_run):
    import pandas as pd

    _, _, logged, root, _ = one_run
    arrays, got = _arrays(root), logged.data.metrics
    per_image = pd.read_csv(root / "tables/per_image.csv")
    np.testing.assert_array_equal(per_image["index"], arrays["indices"])
    np.testing.assert_array_equal(per_image["label"], arrays["labels"])
    table = pd.read_csv(root / "tables/metrics.csv").set_index("metric")
    for name in SIX_METRICS | READOUTS:
        assert per_image[name].mean() == pytest.approx(got[name], abs=1e-9)
        assert table.loc[name, "value"] == pytest.approx(got[name], abs=1e-12) and table.loc[name, "n"] == 32
        assert got[f"{name}_lo"] == pytest.approx(table.loc[name, "lo"])
        assert got[f"{name}_hi"] == pytest.approx(table.loc[name, "hi"])
        assert got[f"{name}_lo"] <= got[name] + 1e-12 and got[name] <= got[f"{name}_hi"] + 1e-12
        assert table.loc[name, "method"].startswith("half-samples (B=30)")
        # A PCA map is refitted on each half-sample (metrics.refit_map: null), and the method says so.
        refitted = name in resampling.MAP_METRICS
        assert ("the 2-D map refitted on each half-sample" in table.loc[name, "method"]) == refitted, name
        assert "2-D map held fixed" not in table.loc[name, "method"]
    assert table.loc["rankme", "method"].startswith("none: ") and np.isnan(table.loc["rankme", "lo"])
    # Each metric on each half-sample: what compare.py pairs two runs on.
    halves = pd.read_csv(root / "tables/halves.csv")
    assert len(halves) == 30 and set(halves.columns) == {"half"} | SIX_METRICS | READOUTS | {"twonn_id"}


def test_second_run_at_another_layer_hits_the_cache(tiny_vit, class_folder, tmp_path):
    base = ["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={class_folder}",
            "reducer=pca", "metrics.k=5", "plots.enabled=false", "metrics.probe=false", "tracking=none"]
    run(compose(base, tmp_path))
    entries = cache_entries(tmp_path / "cache")
    assert len(entries) == 1
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["num_layers"] == 3 and "layer000.cls" in meta["arrays"] and "layer002.mean" in meta["arrays"]
    run(compose(base + ["pool=cls", "layer=0"], tmp_path))
    assert cache_entries(tmp_path / "cache") == entries  # nothing new was extracted


def test_metrics_rank_structure_above_shuffled(class_folder):
    from latentmap import data

    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    from latentmap.cache import embeddings
    from latentmap.models import PixelsBackbone

    features = embeddings(PixelsBackbone(size=16), dataset, -1, "embed", cache_dir=class_folder.parent / "c",
                          how=extraction()).values
    labels = data.labels_of(dataset)
    from sklearn.decomposition import PCA

    coords = PCA(2).fit_transform(features)
    structured = metrics.score(features, coords, labels, k=5)
    shuffled = metrics.score(features, coords, np.random.default_rng(0).permutation(labels), k=5)
    random_map = metrics.score(features, np.random.default_rng(0).normal(size=coords.shape), labels, k=5)
    assert structured["knn_acc_hd"] > 0.9 > 0.6 > shuffled["knn_acc_hd"]
    assert structured["silhouette_hd"] > shuffled["silhouette_hd"] + 0.2
    assert structured["trustworthiness"] > random_map["trustworthiness"] + 0.1
    assert structured["continuity"] > random_map["continuity"] + 0.1


def test_pca_dims_runs_pca_before_the_reducer(class_folder, tmp_path):
    """PCA(2) after PCA(8) is PCA(2): the logged map equals a direct PCA of the logged embeddings
    (euclidean geometry: the reducer sees the embeddings as they are)."""
    from sklearn.decomposition import PCA

    base = ["model=pixels", "model.size=8", "dataset=imagefolder", f"dataset.path={class_folder}", "metrics.k=5",
            "plots.enabled=false", "metrics.distance=euclidean"]
    run(compose(base + ["reducer=pca", "+reducer.pca_dims=8"], tmp_path))
    client, logged = _only_run(tmp_path)
    root = _artifacts(client, logged)
    embeddings, coords = np.load(root / "arrays/embeddings.npy"), np.load(root / "arrays/coords.npy")
    reference = PCA(2, random_state=42).fit_transform(embeddings)
    np.testing.assert_allclose(np.abs(coords), np.abs(reference), atol=1e-4)  # up to each axis' sign
    assert logged.data.params["reducer.pca_dims"] == "8"


def test_opentsne_reducer_maps_structure(class_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="latentmap.runner"):
        scores = run(compose(["model=pixels", "model.size=8", "dataset=imagefolder", f"dataset.path={class_folder}",
                              "reducer=opentsne", "reducer.perplexity=5", "reducer.pca_dims=10", "metrics.k=5",
                              "plots.enabled=false", "metrics.probe=false", "tracking=none"], tmp_path))
    assert scores["trustworthiness"] > 0.8 and scores["knn_acc_2d"] > 0.9
    # perplexity 5 fits 32 images, not a half-sample's 16 (openTSNE: perplexity < (N - 1) / 3): by default
    # the map is then held fixed, said in the log, where metrics.refit_map=true refuses (ERRORS below)
    assert "held fixed on the half-samples, whose 16 images are too few for this reducer's settings" in caplog.text


def test_unlabelled_flat_folder_skips_label_metrics(tmp_path):
    folder = tmp_path / "flat"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    scores = run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca",
                          "metrics.k=5", "plots.max_thumbnails=5"], tmp_path / "out"))
    assert set(scores) == {"trustworthiness", "continuity", "twonn_id", "rankme"}  # the label-free ones
    _, logged = _only_run(tmp_path / "out")
    assert logged.info.status == "FINISHED"


def _broken_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "broken"
    write_class_images(folder, n_per_class=4)
    bad = folder / "red" / "zz_truncated.png"
    bad.write_bytes((folder / "red" / "000.png").read_bytes()[:40])
    return folder, bad


def _assert_nothing_half_written(cache_dir: Path) -> None:
    """No cache entry a later run would read is incomplete, and no staging folder is left."""
    leftovers = cache_entries(cache_dir) if cache_dir.exists() else []
    assert all((p / "meta.json").is_file() for p in leftovers), leftovers


def _assert_failed(output_dir: Path, message: str) -> None:
    import re

    _, logged = _only_run(output_dir)
    assert logged.info.status == "FAILED"
    assert re.search(message, logged.data.tags["error"])
    _assert_nothing_half_written(output_dir / "cache")


# Mistakes the run catches with the data and the model in hand; run-key, reducer and metric checks
# have their own tests (test_config, test_reduce, test_metrics).
ERRORS = [
    (["layer=14", "pool=cls"], r"layer=14 is out of range for .*, which has 3 blocks: use -3\.\.2"),
    (["model=pixels", "model.name=pixels", "pool=cls"],
     "pool=cls needs block outputs, but pixels has none: use pool=embed"),
    (["layer=1"], "layer=1 with pool=embed.*pick pool=cls or pool=mean"),
    # a model without blocks: no pool to suggest (pool=cls was then refused as "pixels has none")
    (["model=pixels", "model.name=pixels", "layer=3"], r"^layer=3: pixels has no blocks to read, only its "
                                                       r"embedding: set layer=-1$"),
    (["pool=max"], "pool='max' is not a pooling: choose one of embed, cls, mean"),
    (["reducer=tsne", "reducer.perplexity=40"], r"reducer.perplexity=40 is too large for N=32 images"),
    (["reducer=opentsne"], r"reducer.perplexity=30 is too large for N=32 images: openTSNE needs"),
    (["metrics.k=16"], r"metrics.k=16 is too large for N=32 images: trustworthiness needs k < N/2, so use "
                       r"metrics.k<=15 or more images$"),
    (["metrics.max_points=9"], r"metrics.k=5 is too large for N=9 images: .* so use metrics.k<=4 or more images "
                               r"\(raise metrics.max_points, now 9\)"),  # the cap is named, not only k
    (["dataset.limit=2"], r"^N=2 scored images are too few: trustworthiness needs k < N/2 with k >= 1, so use "
                          r"more images: at least 3$"),  # no k can do: none suggested
    (["audit.against=/no/such/folder"], r"^audit.against='/no/such/folder' is not a directory"),  # not dataset.path
    (["audit.against=/no/such/cifar.dataset.v2"], r"^audit.against='/no/such/cifar.dataset.v2' is not a directory "
                                                  r"\(/no/such/cifar.dataset.v2\)$"),  # the value as written
    (["+audit.against={_target_: latentmap.data.ImageFolderSource, path: /no/such/folder}"],
     r"^audit.against.path='/no/such/folder' is not a directory"),
    # 32 images: UMAP's 20 neighbours fit the run's map, not a half-sample's 16 images (metrics.refit_map)
    (["reducer=umap", "reducer.n_neighbors=20", "metrics.refit_map=true"],
     r"^metrics.refit_map fits the map again on half-samples of 16 images, and reducer.n_neighbors=20 is too large "
     r"for N=16 images: .*\(or metrics.refit_map=false holds the run's map fixed\)$"),
    (["dataset.limit=0"], "dataset.limit=0 must be a positive integer"),
    (["audit.min_cluster_size=33"], r"^audit.min_cluster_size=33 is larger than the N=32 scored images HDBSCAN "
                                    r"clusters: use audit.min_cluster_size<=32, or null"),  # a traceback at the end
    (["metrics.max_points=abc"], "metrics.max_points='abc'"),
    (["batch_size=0"], "batch_size=0 must be a positive integer"),
]


@pytest.mark.parametrize("overrides,message", ERRORS)
def test_user_errors_are_one_line_and_write_nothing(overrides, message, tiny_vit, class_folder, tmp_path):
    base = ["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={class_folder}",
            "reducer=pca", "metrics.k=5", "tracking=none"]
    with pytest.raises(ConfigError, match=message):
        run(compose(base + overrides, tmp_path))
    _assert_nothing_half_written(tmp_path / "cache")


def test_device_cuda_without_cuda_is_one_line_before_any_run(class_folder, tmp_path, monkeypatch):
    """device=cuda where CUDA is not available: one line and no MLflow run (a FAILED run was made
    first; a pixels run on a cache hit even finished without a word)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device='cuda' but CUDA is not available here: use device=auto or cpu$"):
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                     "metrics.k=5", "device=cuda"], tmp_path))
    assert mlflow_runs(tmp_path)[1] == [] and not (tmp_path / "cache").exists()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # a pixels run went on on the CPU
    with pytest.raises(ConfigError, match=r"^device='mps' but MPS \(Apple's GPU\) is not available here"):
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                     "metrics.k=5", "device=mps"], tmp_path))
    assert mlflow_runs(tmp_path)[1] == [] and not (tmp_path / "cache").exists()


def test_a_cache_dir_that_cannot_be_written_is_one_line_before_any_run(class_folder, tmp_path):
    """cache_dir under a file (or on /proc) was a FileNotFoundError traceback at extraction and a
    FAILED run whose error named no key: now one line, before the MLflow run exists."""
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"^cache_dir='.*/a-file/cache' cannot be written \(.*/a-file is not a "
                                          r"folder\): choose a writable folder"):
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                     "metrics.k=5", f"cache_dir={tmp_path / 'a-file' / 'cache'}"], tmp_path))
    assert mlflow_runs(tmp_path)[1] == []
    with pytest.raises(ConfigError, match="metrics.k=16 is too large"):  # a writable one is not made by the check
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                     "metrics.k=16", f"cache_dir={tmp_path / 'new' / 'cache'}"], tmp_path))
    assert not (tmp_path / "new").exists()


def test_a_mistake_caught_before_work_leaves_no_run_one_met_later_a_failed_run(tiny_vit, class_folder, tmp_path):
    """metrics.k against the dataset's size is checked before the MLflow run exists: no run. A layer
    out of range is found with the model loaded: the run ends FAILED with the line as its error."""
    base = ["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={class_folder}",
            "reducer=pca", "metrics.k=5"]
    with pytest.raises(ConfigError, match="metrics.k=16 is too large for N=32 images"):
        run(compose(base + ["metrics.k=16"], tmp_path))
    assert mlflow_runs(tmp_path)[1] == [] and not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="layer=14 is out of range"):
        run(compose(base + ["layer=14", "pool=cls"], tmp_path))
    _assert_failed(tmp_path, "layer=14 is out of range")


def test_data_errors(tmp_path, tiny_vit):
    folder, bad = _broken_folder(tmp_path)
    cases = [
        ([f"dataset.path={folder}", "dataset.on_error=raise"], f"unreadable image {bad}.*dataset.on_error=skip"),
        (["dataset.on_error=ignore"], "dataset.on_error='ignore' is not a way to handle an unreadable image: choose "
                                      "one of skip, raise"),
        ([f"dataset.path={tmp_path / 'missing'}"], "dataset.path=.* is not a directory"),
        ([f"dataset.path={tmp_path / 'empty'}"], "dataset.path=.* holds no images"),
        ([f"dataset.path={folder / 'one'}"], "the dataset has 1 class; silhouette and k-NN accuracy need at least 2: "
                                             "add images of another class, or skip the label metrics: an unlabelled "
                                             "flat folder with dataset=imagefolder, dataset.label_column=null with "
                                             "dataset=hf"),
        (["model=hf", f"model.name={tmp_path / 'no-model'}"], "model.name=.* is not a directory"),
        (["model=hf", "model.name=someone/not-on-disk"], "could not be downloaded: the network"),
        (["model=timm", "model.name=no_such_net"], "model.name='no_such_net' is not a timm model"),
    ]
    (tmp_path / "empty").mkdir()
    write_class_images(tmp_path / "colours", n_per_class=8)
    (folder / "one").mkdir()
    (tmp_path / "colours" / "blue").rename(folder / "one" / "only")  # one class folder, its images in it
    for i, (overrides, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        base = ["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={folder}",
                "reducer=pca", "metrics.k=2"]
        # The first (an unreadable image met during extraction) is checked through MLflow too.
        with pytest.raises(ConfigError, match=message):
            run(compose(base + overrides + ([] if i == 0 else ["tracking=none"]), out))
        if i == 0:
            _assert_failed(out, message)
        else:
            _assert_nothing_half_written(out / "cache")


def test_a_long_tail_of_small_classes_says_the_balanced_accuracy_interval_is_too_narrow(tmp_path, caplog):
    """The calibration's long-tailed mixture (6 to 155 images a class) found probe_balanced_acc's
    interval covering 89-93% of the time: a run in that regime says so; balanced classes do not."""
    from latentmap import resampling

    assert resampling.balanced_undercovers(6, 155) and resampling.balanced_undercovers(19, 76)
    assert not resampling.balanced_undercovers(10, 10) and not resampling.balanced_undercovers(20, 155)
    assert not resampling.balanced_undercovers(8, 31)
    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=24)
    smallest = sorted(folder.iterdir())[0]
    for extra in sorted(smallest.iterdir())[5:]:  # one class of 5 images beside classes of 24
        extra.unlink()
    for name, path in (("tail", folder), ("even", tmp_path / "even-images")):
        if name == "even":
            write_class_images(path, n_per_class=12)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="latentmap.runner"):
            run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={path}", "reducer=pca", "metrics.k=3",
                         "plots.enabled=false", "audit.enabled=false", "metrics.bootstrap=4", "tracking=none"],
                        tmp_path / name))
        said = [r.getMessage() for r in caplog.records if "probe_balanced_acc" in r.getMessage()]
        if name == "tail":
            assert said == ["probe_balanced_acc: the smallest class has 5 scored images, the largest 24; on a long "
                            "tail of classes this small its interval covered 89-93% of the time where 95% was asked, "
                            "and two equal runs were called different in 6-12% (docs/calibration.md, a long tail of "
                            "classes): read its interval as too narrow"], said
        else:
            assert said == [], said


def test_a_class_whose_every_image_was_skipped_is_said(tmp_path, caplog):
    """A class folder of unreadable files only: the run goes on with the other classes and a warning
    names the class that is gone (it dropped out of per_class.csv without a word), and no table has a
    row or column for it (the confusion and centroid-distance tables kept one of zeros and NaN)."""
    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=8)
    (folder / "zebra").mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / "zebra" / name).write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="latentmap.runner"):
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "metrics.k=5",
                     "plots.map=false", "metrics.bootstrap=4"], tmp_path))
    client, logged = _only_run(tmp_path)
    assert logged.info.status == "FINISHED" and logged.data.metrics["n_skipped"] == 2
    said = [r.getMessage() for r in caplog.records if "lost every image" in r.getMessage()]
    assert said == ["class zebra lost every image to the skipped ones: it has no row in tables/per_class.csv and no "
                    "point in any plot"]
    per_class = pd.read_csv(client.download_artifacts(logged.info.run_id, "tables/per_class.csv"))
    assert "zebra" not in set(per_class.iloc[:, 0].astype(str))
    for table in ("confusion", "centroid_distances_2d", "centroid_distances_hd"):
        read = pd.read_csv(client.download_artifacts(logged.info.run_id, f"tables/{table}.csv"), index_col=0)
        assert list(read.index) == list(read.columns) == ["blue", "green", "red", "yellow"], table
        assert np.isfinite(read.to_numpy(dtype=float)).all(), table


def test_unreadable_images_are_skipped_counted_and_named(tmp_path, caplog):
    """A truncated JPEG, a text file named .png and an empty .jpg among 32 good images: the run
    finishes on the 32, logs n_skipped=3, names each file and lists them in tables/skipped.csv; a
    cache hit skips them again and names them too."""
    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=8)
    truncated = folder / "blue" / "x_truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text = folder / "green" / "x_notes.png"
    text.write_text("not an image")
    empty = folder / "red" / "x_empty.jpg"
    empty.write_bytes(b"")
    overrides = ["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "metrics.k=5",
                 "plots.enabled=false", "metrics.probe=false", "dataset.holdout=0.25"]  # its rows lose them too
    for attempt in ("miss", "hit"):
        caplog.clear()
        out = tmp_path / f"out-{attempt}"
        run(compose([*overrides, f"cache_dir={tmp_path / 'cache'}"], out))
        client, logged = _only_run(out)
        assert logged.info.status == "FINISHED" and logged.data.tags["cache"] == attempt
        assert logged.data.metrics["n_skipped"] == 3
        arrays = Path(client.download_artifacts(logged.info.run_id, "arrays"))
        assert np.load(arrays / "embeddings.npy").shape == (32, 32 * 32 * 3)
        files = sorted(p for d in sorted(folder.iterdir()) for p in sorted(d.iterdir()))  # imagefolder order
        assert {files[i] for i in np.load(arrays / "indices.npy")}.isdisjoint({truncated, text, empty})
        for path in (truncated, text, empty):  # named on a hit too, in the run's one line
            assert any(str(path) in record.getMessage() for record in caplog.records), path
        table = pd.read_csv(client.download_artifacts(logged.info.run_id, "tables/skipped.csv"))
        assert [Path(f) for f in table["file"]] == [truncated, text, empty]  # dataset order: blue, green, red
        assert [files[i] for i in table["index"]] == [Path(f) for f in table["file"]]
    # The run read back (neighbors.py, export.py): its dataset is the folder less the 3 files, row for
    # row (it was refused as "no longer matches"), and the unchanged folder is not called changed.
    from latentmap import data
    from latentmap import logged as logged_runs

    caplog.clear()
    read = logged_runs.load(logged.info.run_id, f"sqlite:///{out}/mlflow.db")
    dataset = read.dataset()
    assert np.array_equal(data.column(dataset, "index"), read.indices) and len(dataset) == 32
    paths = [Path(record["path"]) for record in data.undecoded(dataset)["image"]]
    assert paths == [files[i] for i in read.indices]
    assert not any("changed or moved" in record.getMessage() for record in caplog.records)
    with pytest.raises(ConfigError, match="3 images of this dataset are unreadable") as refused:
        run(compose([*overrides, f"cache_dir={tmp_path / 'cache'}", "dataset.on_error=raise"], tmp_path / "out-raise"))
    for path in (truncated, text, empty):  # named from the cache hit too, each with why it fails
        assert f"{path}: " in str(refused.value), str(refused.value)
    assert str(refused.value).endswith("Fix or remove them, or set dataset.on_error=skip")


def test_cli_user_error_is_one_line_and_nonzero(class_folder, tmp_path):
    """``python run.py`` with a mistake found once the model is known (run in this process: the exit
    code is the process's): exit 1, one error line, no traceback, the run FAILED."""
    code, output = run_script(["run.py", f"output_dir={tmp_path}", "model=pixels", "dataset=imagefolder",
                               f"dataset.path={class_folder}", "layer=1", "reducer=pca", "metrics.k=5"], tmp_path)
    assert code == 1 and "Traceback" not in output
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "layer=1: pixels has no blocks to read, only its embedding: set layer=-1" in errors[0]
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_copies_of_one_image_end_in_one_line_not_a_traceback(tmp_path):
    """Every image the same picture (here 3 copies a class of one PNG): nothing to map or score. The
    run ends FAILED in one line naming the feature and what to check (the probe failed on 0 features
    in a 65-line traceback); images that differ from the first only in one pixel run as usual."""
    from PIL import Image

    picture = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for name in ("a", "b"):
        (tmp_path / "same" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(picture).save(tmp_path / "same" / name / f"{i}.png")
    command = ["run.py", f"output_dir={tmp_path}", "model=pixels", "model.size=8", "dataset=imagefolder",
               f"dataset.path={tmp_path / 'same'}", "reducer=pca", "metrics.k=1", "plots.enabled=false"]
    code, output = run_script(command, tmp_path)
    assert code == 1 and "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "every image's embedding (pixels · embed) is the same point" in errors[0], errors
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags["error"].startswith("ConfigError: every image's embedding")

    changed = picture.copy()
    changed[0, 0] = 255 - changed[0, 0]
    Image.fromarray(changed).save(tmp_path / "same" / "b" / "3.png")
    code, output = run_script(command, tmp_path)
    assert code == 0, output[-3000:]


@pytest.mark.parametrize("k,warned", [(7, False), (8, True)])
def test_a_k_too_large_for_the_half_samples_is_said_before_work(class_folder, tmp_path, caplog, k, warned):
    """32 images: the run's trustworthiness takes k < 16, but its half-samples of 16 images need k < 8
    (scikit-learn's own rule, checked below), so at k = 8 the intervals would vanish with a vague
    reason: one warning before extraction names the key, the half-samples' size and the fix."""
    from sklearn.manifold import trustworthiness

    from latentmap import reduce as reducers
    from latentmap.config import instantiate_node
    from latentmap.runner import _checked_labels

    cfg = compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                   f"metrics.k={k}"], tmp_path)
    dataset = instantiate_node(cfg.dataset, "dataset").load(seed=0)
    with caplog.at_level(logging.WARNING, logger="latentmap.runner"):
        _checked_labels(cfg, dataset, reducers.build(cfg.reducer))
    said = [r.getMessage() for r in caplog.records if "half-samples of 16 images" in r.getMessage()]
    assert len(said) == int(warned)
    if warned:
        assert said[0].startswith("metrics.k=8 is too large") and "use metrics.k<=7 for intervals" in said[0]
    half = np.random.default_rng(0).normal(size=(16, 5))
    if warned:
        with pytest.raises(ValueError):
            trustworthiness(half, half[:, :2], n_neighbors=k)
    else:
        assert trustworthiness(half, half[:, :2], n_neighbors=k) > 0


def test_cli_unknown_option_lists_the_choices(tmp_path):
    code, output = run_script(["run.py", f"output_dir={tmp_path}", "reducer=tsen"], tmp_path)
    assert code == 1 and "Traceback" not in output
    assert output.strip() == ("error: reducer=tsen is not an option of reducer: the closest is tsne "
                              "(options: opentsne, pca, tsne, umap)")


def test_secrets_never_reach_params_or_artifacts(monkeypatch, class_folder, tmp_path):
    """A token typed as an override and a password read from the environment are logged as ***."""
    monkeypatch.setenv("LM_TEST_PASSWORD", "hunter2-from-env")
    cfg = compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                   "metrics.k=5", "plots.enabled=false", "metrics.probe=false", "+hf_token=tok-123-secret",
                   "+extra.db_password=${oc.env:LM_TEST_PASSWORD}", "+extra.note=${oc.env:LM_TEST_PASSWORD}"],
                  tmp_path)
    run(cfg)
    client, logged = _only_run(tmp_path)
    assert logged.data.params["hf_token"] == "***" and logged.data.params["extra.db_password"] == "***"
    assert logged.data.params["extra.note"] == "***"  # interpolated from the environment
    config = Path(client.download_artifacts(logged.info.run_id, "config.yaml")).read_text()
    for secret in ("tok-123-secret", "hunter2-from-env"):
        assert secret not in config and all(secret not in v for v in logged.data.params.values())


def test_a_run_scores_the_sample_it_says(tmp_path):
    """metrics.max_points=120 on 300 digits: the logged scores are the metrics of those 120 rows."""
    cfg = compose(["model=pixels", "dataset.limit=300", "reducer=pca", "metrics.max_points=120",
                   "plots.enabled=false", "metrics.probe=false"], tmp_path)
    scores = run(cfg)
    client, runs = mlflow_runs(tmp_path)
    assert runs[0].data.tags["metrics_points"] == "120"
    folder = client.download_artifacts(runs[0].info.run_id, "arrays")
    embeddings, coords, labels = (np.load(f"{folder}/{name}.npy") for name in ("embeddings", "coords", "labels"))
    rows = metrics.scored_rows(120, labels, 300, 42)
    expected = metrics.score(embeddings[rows], coords[rows], labels[rows], k=10, folds=5, seed=42)
    from latentmap import probes

    readouts = probes.per_image(embeddings[rows], labels[rows], 5, 42, "cosine", 20, 0.07, linear=False)
    expected.update({name: values.mean() for name, values in readouts.items()})
    from latentmap import stats

    unit = metrics.embedding_space(embeddings[rows], "cosine")  # the geometry of the same 120 rows
    expected.update({"twonn_id": stats.twonn_id(unit), "rankme": stats.effective_rank(unit)})
    assert scores == pytest.approx(expected, abs=1e-9)


def _logged(tmp_path, *overrides):
    """Run on 60 digits as raw 8x8 pixels, sklearn t-SNE from a random start (its PCA start would make
    every seed give the same map), its map held fixed on the half-samples (refitted, 100 half-samples
    would cost 100 t-SNE fits a run: the refit has its own tests); (client, the run, its arrays folder)."""
    run(compose(["model=pixels", "model.size=8", "dataset.limit=60", "reducer=tsne", "reducer.perplexity=10",
                 "reducer.init=random", "metrics.refit_map=false",
                 "metrics.k=5", "plots.enabled=false", "metrics.probe=false", "metrics.bootstrap=100", *overrides],
                tmp_path))
    client, runs = mlflow_runs(tmp_path)
    logged = max(runs, key=lambda r: r.info.start_time)
    return client, logged, Path(client.download_artifacts(logged.info.run_id, "arrays"))


def test_each_source_of_randomness_has_its_own_seed(tmp_path):
    """data_seed picks the images, reducer_seed the map; both follow seed unless set."""
    _, base, arrays = _logged(tmp_path, "seed=3")
    _, other_map, other_map_arrays = _logged(tmp_path, "seed=3", "reducer_seed=4")
    _, other_images, other_images_arrays = _logged(tmp_path, "seed=3", "data_seed=5")
    from latentmap import data

    np.testing.assert_array_equal(np.load(arrays / "indices.npy"), data.DigitsSource(limit=60).load(seed=3)["index"])
    np.testing.assert_array_equal(np.load(other_map_arrays / "indices.npy"), np.load(arrays / "indices.npy"))
    assert not np.allclose(np.load(other_map_arrays / "coords.npy"), np.load(arrays / "coords.npy"))
    np.testing.assert_array_equal(np.load(other_images_arrays / "indices.npy"),
                                  data.DigitsSource(limit=60).load(seed=5)["index"])
    assert base.data.params["reducer.random_state"] == "3" and other_map.data.params["reducer.random_state"] == "4"
    assert other_images.data.params["reducer.random_state"] == "3"
    with pytest.raises(ConfigError, match=r"cv_seed=-1 must be an integer in \[0, 2147483647\]"):
        run(compose(["cv_seed=-1", "tracking=none"], tmp_path))


def test_repeated_fits_report_the_mean_and_spread_of_the_2d_metrics(tmp_path):
    """reducer.repeats=2 equals two single fits with reducer_seed 3 and 4: each fit's value as a
    step of <metric>_fit, the mean as the metric, the sample standard deviation as <metric>_std."""
    singles = [_logged(tmp_path / f"single{s}", f"reducer_seed={s}")[1].data.metrics for s in (3, 4)]
    client, repeated, arrays = _logged(tmp_path / "repeated", "reducer_seed=3", "reducer.repeats=2")
    for metric in ("trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d"):
        per_fit = [p.value for p in sorted(client.get_metric_history(repeated.info.run_id, f"{metric}_fit"),
                                           key=lambda p: p.step)]
        assert per_fit == pytest.approx([single[metric] for single in singles], abs=1e-9)
        assert repeated.data.metrics[metric] == pytest.approx(np.mean(per_fit), abs=1e-9)
        assert repeated.data.metrics[f"{metric}_std"] == pytest.approx(np.std(per_fit, ddof=1), abs=1e-9)
    assert repeated.data.metrics["knn_acc_hd"] == pytest.approx(singles[0]["knn_acc_hd"], abs=1e-12)  # no map in it
    assert len(set(round(s["trustworthiness"], 9) for s in singles)) > 1  # the fits do differ
    assert "knn_acc_hd_fit" not in repeated.data.metrics


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_a_folder_without_readable_images_is_one_line_no_run_and_no_cache(tmp_path, on_error):
    """Text files named .jpg/.png: whatever dataset.on_error, one line says no image is readable and
    names the first few files and why; no MLflow run and no cache entry are left."""
    folder = tmp_path / "not-images"
    for c in ("cats", "dogs"):
        for i in range(3):
            (folder / c).mkdir(parents=True, exist_ok=True)
            (folder / c / f"{i}.{'jpg' if i % 2 else 'png'}").write_text("this is not an image\n")
    with pytest.raises(ConfigError) as caught:
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca",
                     f"dataset.on_error={on_error}"], tmp_path))
    line = str(caught.value)
    assert "\n" not in line and line.startswith("no readable images: none of the 6 images could be decoded")
    assert f"{folder / 'cats' / '0.png'}: UnidentifiedImageError" in line and "too large" not in line
    assert line.count("UnidentifiedImageError") == 3  # the first three, each with its reason
    assert mlflow_runs(tmp_path)[1] == [] and not (tmp_path / "cache").exists()


def test_images_above_the_pixel_limit_are_skipped_or_read_small_never_a_traceback(tmp_path, caplog):
    """dataset.max_image_pixels (PIL's decompression-bomb guard), here 2,000 pixels against 32x32
    images: a 64x64 PNG above it is skipped with a warning naming it and the setting (or, with
    on_error=raise, one line); a 64x64 JPEG above it is decoded at 1/8 scale and kept, in the plots'
    thumbnails too (they decode under the same limit)."""
    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=8)
    rng = np.random.default_rng(0)
    big_png, big_jpeg = folder / "red" / "zz_big.png", folder / "blue" / "zz_big.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big_png)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(big_jpeg, quality=90)
    base = ["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "metrics.k=3",
            "dataset.max_image_pixels=2000", "metrics.probe=false", "plots.map=false", "plots.dpi=30"]
    caplog.set_level(logging.INFO)
    run(compose(base, tmp_path / "skip"))
    _, logged = _only_run(tmp_path / "skip")
    assert logged.data.metrics["n_skipped"] == 1 and logged.data.tags["n_images"] == "33"  # 32 + the JPEG
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "zz_big" in r.getMessage()]
    assert len(warned) == 2 and "tables/skipped.csv lists them" in warned[1]  # the skip, then the run's count
    assert str(big_png) in warned[0] and "64x64 = 4,096 pixels" in warned[0]
    assert "set dataset.max_image_pixels=4096 (or null for no limit)" in warned[0]
    assert any(f"{big_jpeg} is 64x64 pixels: decoded at reduced size 8x8" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=rf"image {big_png} is 64x64 = 4,096 pixels, above dataset.max_image_pixels"):
        run(compose(base + ["dataset.on_error=raise", "tracking=none"], tmp_path / "raise"))
    # The plots decode under the run's limit, not PIL's: lifted, the big PNG is drawn; at 2,000 it is refused.
    from latentmap import data
    from latentmap.figures import thumbnail_arrays

    dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
    row = [i for i, path in enumerate(data.undecoded(dataset)["image"]) if path["path"] == str(big_png)]
    assert thumbnail_arrays(dataset, row, max_pixels=None)[0].shape == (48, 48, 3)
    with pytest.raises(ConfigError, match="above dataset.max_image_pixels=2000"):
        thumbnail_arrays(dataset, row, max_pixels=2000)
    with pytest.raises(ConfigError, match=r"dataset.max_image_pixels=-5 must be a positive integer"):
        run(compose(base + ["dataset.max_image_pixels=-5", "tracking=none"], tmp_path / "bad"))


@pytest.mark.parametrize("overrides, scored, refits", [
    (["reducer=pca"], 10**6, True), (["reducer=umap"], 1797, True), (["reducer=tsne"], 2000, True),
    (["reducer=umap"], 2001, False), (["reducer=tsne"], 20000, False), (["reducer=opentsne"], 5000, False),
    (["reducer=umap", "metrics.refit_map=true"], 20000, True), (["reducer=pca", "metrics.refit_map=false"], 10, False)])
def test_the_map_is_refitted_on_half_samples_where_a_fit_costs_little_or_where_asked(overrides, scored, refits,
                                                                                     tmp_path):
    from latentmap.runner import refits_map
    from latentmap.settings import METRICS, REFIT_MAPS_UP_TO

    said = f"{REFIT_MAPS_UP_TO:,} scored images"  # where a user reads the rule
    assert said in " ".join((CONF / "metrics" / "default.yaml").read_text().replace("#", " ").split())
    assert said in METRICS["refit_map"].null
    cfg = compose(overrides, tmp_path)
    assert refits_map(cfg, scored) is refits
    # The default refits only where the reducer's settings allow a fit on a half-sample's images (t-SNE's
    # perplexity 30 needs more than 30, UMAP's n_neighbors 15 more than 15); true insists (and the
    # run refuses before extraction: ERRORS above).
    tiny = 15 if "reducer=umap" in overrides else 30
    assert refits_map(cfg, scored, tiny) is (refits and ("metrics.refit_map=true" in overrides
                                                         or "reducer=pca" in overrides))


def test_a_pca_run_s_half_samples_score_a_pca_fitted_on_each_half(one_run):
    """tables/halves.csv's map metrics are those of PCA fitted again on each half-sample's images (in
    the run's geometry, with the run's seed), not of the run's map: a half's silhouette_2d equals
    scikit-learn's on its own PCA map, and differs from the run's map restricted to the half."""
    import pandas as pd
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    _, _, logged, root, _ = one_run
    arrays = _arrays(root)
    halves = resampling.halves(arrays["labels"], 32, 30, int(logged.data.params["cv_seed"]))
    table = pd.read_csv(root / "tables/halves.csv")
    space = metrics.embedding_space(arrays["embeddings"], "cosine")
    differs = 0
    for b in (0, 1, 2):
        rows = np.flatnonzero(halves.members[b])
        own = PCA(2, random_state=int(logged.data.params["reducer_seed"])).fit_transform(space[rows])
        assert table["silhouette_2d"][b] == pytest.approx(silhouette_score(own, arrays["labels"][rows]), abs=1e-6)
        held = silhouette_score(arrays["coords"][rows], arrays["labels"][rows])  # the run's map on the half
        differs += abs(table["silhouette_2d"][b] - held) > 1e-6
    assert differs


@pytest.mark.filterwarnings("ignore:Glyph .* missing from:UserWarning")  # matplotlib: one a figure
def test_class_folders_named_in_any_script_or_with_dollar_signs_are_plotted_as_named(tmp_path, caplog):
    """Folder names are class names: "$5 to $10" is drawn as written (not a formula), and where no
    installed font has a name's characters (a Chinese name on a machine without a CJK font), one
    warning names them and the fix, and the run still finishes with its figures."""
    from latentmap import plots

    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=6)
    (folder / "blue").rename(folder / "$5 to $10")
    (folder / "red").rename(folder / "猫")
    (folder / "green").rename(folder / "$^$")  # not a formula matplotlib can read: it failed the figures
    caplog.set_level(logging.INFO)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "metrics.k=3",
                     "metrics.probe=false", "metrics.bootstrap=0", "plots.map=false", "plots.dpi=30"], tmp_path))
    glyphs = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    assert glyphs == [], glyphs[:3]  # said once in the run's line (below), not ~20 times a figure by matplotlib
    client, (logged,) = mlflow_runs(tmp_path)
    assert logged.info.status == "FINISHED"
    assert {"scatter.png", "centroids.png"} <= {Path(a.path).name for a in client.list_artifacts(
        logged.info.run_id, "plots")}
    classes = json.loads(Path(client.download_artifacts(logged.info.run_id, "arrays/classes.json")).read_text())
    assert {"$5 to $10", "猫", "$^$"} <= set(classes)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "the PNG figures use" in
              r.getMessage()]
    if plots.missing_characters(["猫"]):  # no font here has it (this machine: none has)
        assert len(warned) == 1 and "1 character of the class names or title (猫) is in none" in warned[0], warned
        assert "apt install fonts-noto-cjk)" in warned[0]
    else:
        assert warned == []


def test_an_output_dir_inside_the_image_folder_is_never_read_back_as_images(class_folder, tmp_path, caplog):
    """output_dir inside dataset.path (a run started in the image folder, output_dir=outputs): the
    run's own PNGs (plots, thumbnails) became a class 'outputs' from the third run on, and a flat
    folder was refused as one folder of images. The folder a command writes to is passed over; an
    output_dir that is the image folder itself is refused."""
    import shutil

    labelled, flat = tmp_path / "labelled", tmp_path / "flat"
    shutil.copytree(class_folder, labelled)
    flat.mkdir()
    for image in sorted(class_folder.rglob("*.png"))[:30]:
        shutil.copy(image, flat / f"{image.parent.name}-{image.name}")
    for folder, metric in ((labelled, "knn_acc_hd"), (flat, "trustworthiness")):
        seen = []
        for _ in range(3):
            scores = run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca",
                                  "metrics.k=5", "metrics.bootstrap=0", "plots.max_thumbnails=10",
                                  "plots.grid_images=4"], folder / "outputs"))
            seen.append(scores[metric])
        assert list((folder / "outputs").rglob("*.png")), "the runs drew their plots inside the image folder"
        _, runs = mlflow_runs(folder / "outputs")
        assert {r.data.tags["n_images"] for r in runs} == {str(len(list(folder.glob("*/*.png")) or
                                                                   list(folder.glob("*.png"))))}
        assert len(set(seen)) == 1, seen
    # output_dir the image folder itself: its runs' PNGs would be a class 'mlartifacts' from the second
    # run on (a flat folder would turn into a labelled one). Refused, before a plot is drawn.
    for folder in (labelled, flat):
        with pytest.raises(ConfigError, match=rf"output_dir='{folder}' is the image folder dataset.path reads"):
            run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca"], folder))
        assert not (folder / data.OUTPUT_MARK).exists()  # refused before the mark: the next run reads it
    # output_dir a class folder: the class is passed over with its outputs, and a warning counts its images.
    cls = sorted(p for p in labelled.iterdir() if p.is_dir() and p.name != "outputs")[0]
    (cls / data.OUTPUT_MARK).write_text("")
    caplog.clear()
    found = data.ImageFolderSource(path=str(labelled)).read()
    assert cls.name not in found.features["label"].names
    said = f"{cls} holds {len(list(cls.glob('*.png')))} images of its own, not read"
    assert any(said in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), said
    (cls / data.OUTPUT_MARK).unlink()
    # The image folder of an earlier run's outputs (holding its mark) is refused, saying what to move.
    (labelled / data.OUTPUT_MARK).write_text("")
    (labelled / "multiruns").mkdir()
    with pytest.raises(ConfigError, match=rf"dataset.path='{labelled}' holds an earlier command's outputs .*"
                                          rf"Move multiruns out of it and delete {data.OUTPUT_MARK}"):
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={labelled}", "reducer=pca"],
                    tmp_path / "elsewhere"))


def test_a_dataset_row_without_an_image_is_skipped_or_refused_as_unreadable(class_folder, tmp_path):
    """A Hugging Face set whose image is None in one row failed in the fingerprint with a TypeError
    traceback: the row is an unreadable image, skipped and counted (on_error=skip) or one line."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    files = sorted(class_folder.rglob("*.png"))
    names = sorted(p.name for p in class_folder.iterdir())
    rows = {"image": [str(f) for f in files], "label": [names.index(f.parent.name) for f in files]}
    rows["image"][3] = None
    folder = tmp_path / "saved"
    Dataset.from_dict(rows, features=Features({"image": ImageFeature(), "label": ClassLabel(names=names)})
                      ).save_to_disk(str(folder))
    base = ["model=pixels", "dataset=hf", f"dataset.name={folder}", "reducer=pca", "metrics.k=5",
            "metrics.bootstrap=0", "plots.enabled=false"]
    with pytest.raises(ConfigError, match=r"row 3: the row holds no image \(None\).*dataset.on_error=skip"):
        run(compose([*base, "dataset.on_error=raise"], tmp_path / "raise"))
    run(compose([*base, "dataset.on_error=skip"], tmp_path / "skip"))
    (finished,) = mlflow_runs(tmp_path / "skip")[1]
    assert finished.data.metrics["n_skipped"] == 1 and finished.data.tags["n_images"] == str(len(files) - 1)


def test_an_against_folder_of_unreadable_images_names_audit_against(class_folder, tmp_path):
    """Every image of audit.against unreadable: the line named dataset.path, which was fine."""
    broken = tmp_path / "broken" / "a"
    broken.mkdir(parents=True)
    for i in range(3):
        (broken / f"{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match=r"^no readable images: none of the 3 images .*Point audit.against at "
                                          r"images$") as raised:
        run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                     "metrics.k=5", "tracking=none", f"audit.against={tmp_path / 'broken'}"], tmp_path / "out"))
    assert "dataset.path" not in str(raised.value)


def test_an_audit_part_a_setting_turns_off_is_said_not_skipped_silently(class_folder, tmp_path, caplog):
    """audit.label_issues without the probe, and audit.against with the audit off, did nothing and said
    nothing: each gets its line."""
    import logging

    base = ["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca", "metrics.k=5",
            "metrics.bootstrap=0", "plots.enabled=false", "tracking=none"]
    with caplog.at_level(logging.INFO, logger="latentmap"):
        run(compose([*base, "metrics.probe=false"], tmp_path / "a"))
        assert "label issues: not looked for, they need the linear probe's" in caplog.text
        caplog.clear()
        run(compose([*base, "audit.enabled=false", f"audit.against={class_folder}"], tmp_path / "b"))
    assert f"audit.against={class_folder} is not checked for leakage: audit.enabled=false" in caplog.text
