"""The one function that knows the order of the steps: config in, scores out, all of it logged."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from latentmap import cache, data, metrics, plots, tracking
from latentmap.errors import ConfigError, require_int

log = logging.getLogger(__name__)


def output_dirs(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(artifact folder, Hydra's .hydra folder) of this job."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        return job_dir / "artifacts", job_dir / ".hydra"
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(cfg.output_dir) / "runs" / stamp / "artifacts", None


def instantiate_node(node: DictConfig, group: str):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"{group} ({node.get('_target_')}): {first_line}") from error


_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_run_keys(cfg: DictConfig) -> None:
    """Run-level keys, checked before any work: one clear line for a bad value."""
    require_int("seed", cfg.seed, 0, "seed=42")
    require_int("batch_size", cfg.batch_size, 1, "batch_size=64")
    require_int("num_workers", cfg.num_workers, 0, "num_workers=4")
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps")
    cache.check_precision(cfg.get("precision", "fp32"))
    if "plots" in cfg:
        require_int("plots.max_thumbnails", cfg.plots.max_thumbnails, 0, "plots.max_thumbnails=400")
        require_int("plots.grid_images", cfg.plots.grid_images, 0, "plots.grid_images=40")
        require_int("plots.dpi", cfg.plots.dpi, 1, "plots.dpi=120")
        require_int("plots.neighbours", cfg.plots.neighbours, 1, "plots.neighbours=8")
        require_int("plots.neighbour_queries", cfg.plots.neighbour_queries, 0, "plots.neighbour_queries=6")
        require_int("plots.outliers", cfg.plots.outliers, 0, "plots.outliers=16")
        require_int("plots.map_max_points", cfg.plots.map_max_points, 2, "plots.map_max_points=5000")


# scikit-learn's t-SNE (exact, or Barnes-Hut in one thread) is refused above this many points.
SKLEARN_TSNE_MAX = 20_000


@dataclass(frozen=True)
class Reducer:
    """A configured reducer: the estimator, and the steps latentmap adds around it."""

    estimator: object
    target: str  # its _target_, for messages
    pca_dims: int | None  # PCA to this many dimensions first (None: no PCA step)
    fit_sample: int | None  # fit on a seeded class-stratified sample of this size, transform all


def reducer_settings(node: DictConfig) -> Reducer:
    """The reducer of ``node``, with ``reducer.pca_dims`` and ``reducer.fit_sample`` taken out."""
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(node, resolve=True)
    pca_dims = settings.pop("pca_dims", None)
    if pca_dims is not None:
        require_int("reducer.pca_dims", pca_dims, 2, "reducer.pca_dims=50, or null: no PCA step")
    fit_sample = settings.pop("fit_sample", None)
    if fit_sample is not None:
        require_int("reducer.fit_sample", fit_sample, 3, "reducer.fit_sample=20000 (or null: fit on all)")
    estimator = instantiate_node(OmegaConf.create(settings), "reducer")
    return Reducer(estimator, str(node._target_), pca_dims, fit_sample)


def check_reducer(settings: Reducer, n_samples: int) -> None:
    """Reject settings the data cannot support (naming both numbers) and maps that are not 2-D."""
    reducer = settings.estimator
    target = settings.target
    if settings.fit_sample is not None and settings.fit_sample < n_samples:
        if not hasattr(reducer, "transform"):
            raise ConfigError(
                f"reducer.fit_sample={settings.fit_sample}: {target} cannot place points it was not fitted on "
                "(no transform); use reducer=opentsne, umap or pca for fit-on-a-sample, or dataset.limit"
            )
        n_samples = settings.fit_sample
    if target == "sklearn.manifold.TSNE" and n_samples > SKLEARN_TSNE_MAX:
        raise ConfigError(
            f"reducer=tsne (scikit-learn) cannot take N={n_samples} images: its t-SNE needs hours and "
            f"O(N^2) memory beyond {SKLEARN_TSNE_MAX}; use reducer=opentsne (FFT t-SNE; add "
            f"reducer.fit_sample={SKLEARN_TSNE_MAX} to fit on a sample and place the rest), or "
            f"dataset.limit={SKLEARN_TSNE_MAX}"
        )
    n_components = getattr(reducer, "n_components", 2)
    if n_components != 2:
        raise ConfigError(f"reducer.n_components={n_components!r}: latentmap draws and scores 2-D maps; "
                          "use reducer.n_components=2")
    for key in ("perplexity", "n_neighbors"):
        value = getattr(reducer, key, None)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"reducer.{key}={value!r} must be a number (e.g. reducer.{key}=15)")
    perplexity = getattr(reducer, "perplexity", None)
    if perplexity is not None and type(reducer).__module__.startswith("openTSNE") and 3 * perplexity >= n_samples - 1:
        raise ConfigError(
            f"reducer.perplexity={perplexity} is too large for N={n_samples} images: openTSNE needs "
            f"perplexity < (N - 1) / 3 (try reducer.perplexity={max(1, (n_samples - 1) // 4)})"
        )
    if perplexity is not None and perplexity >= n_samples:
        raise ConfigError(
            f"reducer.perplexity={perplexity} is too large for N={n_samples} images: t-SNE needs "
            f"perplexity < N (try reducer.perplexity={max(1, n_samples // 4)})"
        )
    n_neighbors = getattr(reducer, "n_neighbors", None)
    if n_neighbors is not None and n_neighbors >= n_samples:
        raise ConfigError(
            f"reducer.n_neighbors={n_neighbors} is too large for N={n_samples} images: UMAP needs "
            f"n_neighbors < N (try reducer.n_neighbors={max(2, min(15, n_samples // 4))})"
        )


def metric_rows(max_points, labels: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """Sorted rows the metrics are computed on: all, or a class-stratified sample of ``max_points``."""
    if max_points is None:
        return np.arange(n)
    require_int("metrics.max_points", max_points, 3, "metrics.max_points=20000 (or null: all images)")
    if n <= max_points:
        return np.arange(n)
    return np.sort(data.balanced_order(labels, n, seed)[:max_points])


def depth_tags(feature: str, num_layers: int) -> dict[str, str]:
    """Where in the network a feature sits: block index and relative depth (0 first, 1 last).

    ``embed`` (after the final norm and pooling) counts as depth 1, index ``num_layers``.
    """
    if feature == "embed":
        return {"num_layers": str(num_layers), "layer_index": str(num_layers), "relative_depth": "1.0"}
    index = int(feature[len("layer"):].split(".")[0])
    depth = index / (num_layers - 1) if num_layers > 1 else 1.0
    return {"num_layers": str(num_layers), "layer_index": str(index), "relative_depth": f"{depth:.6g}"}


def reduce_to_2d(settings: Reducer, embeddings: np.ndarray, seed: int = 0,
                 labels: np.ndarray | None = None) -> np.ndarray:
    """(N, 2) map of ``embeddings``, with the optional PCA step and fit-on-a-sample; bad estimator
    settings become ConfigError."""
    if settings.pca_dims is not None and settings.pca_dims < min(embeddings.shape):
        from sklearn.decomposition import PCA

        log.info("PCA to %d dimensions before %s", settings.pca_dims, settings.target)
        embeddings = PCA(n_components=settings.pca_dims, random_state=seed).fit_transform(embeddings)  # (N, pca_dims)
    reducer = settings.estimator
    try:
        if settings.fit_sample is not None and settings.fit_sample < len(embeddings):
            rows = np.sort(data.balanced_order(labels, len(embeddings), seed)[: settings.fit_sample])
            log.info("fitting %s on a class-stratified sample of %d of %d points; transforming all",
                     settings.target, len(rows), len(embeddings))
            reducer.fit(np.asarray(embeddings[rows]))
            coords = reducer.transform(embeddings)  # (N, 2)
        else:
            coords = reducer.fit_transform(embeddings)  # (N, 2)
    except ValueError as error:  # invalid estimator parameters surface as ValueError at fit
        first_line = (str(error).splitlines() or ["ValueError"])[0]
        raise ConfigError(f"reducer ({settings.target}): {first_line}") from error
    return np.asarray(coords, dtype=np.float32)


def thumbnail_arrays(dataset, rows: np.ndarray, size: int = 48) -> list[np.ndarray]:
    """Decode ``rows`` of ``dataset`` into small (h, w, 3) uint8 arrays for the plots."""
    raw = data.undecoded(dataset).select(rows)
    images = []
    for record, index in zip(raw["image"], raw["index"]):
        image = data.decode_rgb(record, index)
        image.thumbnail((size, size))
        images.append(np.asarray(image))
    return images


def _draw(tracker: tracking.Tracker, cfg: DictConfig, dataset, embeddings, coords, labels, names, title):
    """Draw every plot into ``plots/`` and the centroid-distance tables into ``tables/``."""
    seed = int(cfg.seed)
    order = data.balanced_order(labels, len(coords), seed)
    figures = {"scatter": plots.scatter(coords, labels, names, title)}
    grid_rows = order[: int(cfg.plots.grid_images)]
    grid_captions = [names[labels[r]] if names else f"#{r}" for r in grid_rows]
    figures["samples"] = plots.sample_grid(thumbnail_arrays(dataset, grid_rows), grid_captions,
                                           f"samples · {cfg.dataset.get('name', '') or ''}".strip(" ·"))
    thumb_rows = np.sort(order[: int(cfg.plots.max_thumbnails)])
    if len(thumb_rows) < len(coords):
        log.info("thumbnails: drawing a class-stratified subsample of %d of %d points", len(thumb_rows), len(coords))
    figures["thumbnails"] = plots.thumbnails(
        coords[thumb_rows], thumbnail_arrays(dataset, thumb_rows),
        labels[thumb_rows] if labels is not None else None, names,
        f"{title} · {len(thumb_rows)} of {len(coords)} images",
    )
    if labels is not None:
        figures["centroids"] = plots.centroids(coords, labels, names, title)
        for space, points, metric in (("2d", coords, "euclidean"), ("hd", embeddings, "cosine")):
            matrix = metrics.centroid_distances(points, labels, len(names), metric)
            _write_matrix(tracker.path(f"tables/centroid_distances_{space}.csv"), matrix, names)
            where = "2-D map, euclidean" if space == "2d" else "embedding space, cosine"
            figures[f"centroid_distances_{space}"] = plots.heatmap(
                matrix, names, f"class-centroid distances ({where})", f"{metric} distance")
    for name, figure in figures.items():
        figure.savefig(tracker.path(f"plots/{name}.png"), dpi=int(cfg.plots.dpi))


def _look_closer(tracker, cfg: DictConfig, dataset, embeddings, coords, labels, names, title, outlier) -> None:
    """neighbours.png, outliers.png and map.html."""
    from latentmap import interactive, neighbours

    seed, k = int(cfg.seed), min(int(cfg.plots.neighbours), len(coords) - 1)
    order = data.balanced_order(labels, len(coords), seed)
    indices = np.asarray(dataset["index"], np.int64)

    def caption(row: int) -> str:
        return f"{names[labels[row]]} #{indices[row]}" if labels is not None else f"#{indices[row]}"

    queries = order[: int(cfg.plots.neighbour_queries)]
    if len(queries):
        found, _ = neighbours.nearest(embeddings, k, queries)  # (Q, k)
        thumbs = thumbnail_arrays(dataset, np.concatenate([queries, found.ravel()]))
        query_images, neighbour_images = thumbs[: len(queries)], thumbs[len(queries):]
        figure = plots.neighbour_rows(
            query_images, [caption(q) for q in queries],
            [neighbour_images[i * k : (i + 1) * k] for i in range(len(queries))],
            [[caption(n) for n in row] for row in found],
            [[labels is not None and labels[n] != labels[q] for n in row] for q, row in zip(queries, found)],
            f"{title} · {k} nearest neighbours (cosine, embedding space)")
        figure.savefig(tracker.path("plots/neighbours.png"), dpi=int(cfg.plots.dpi))
    top = np.argsort(-outlier["outlier_score"], kind="stable")[: int(cfg.plots.outliers)]
    if len(top):
        captions = [f"{caption(r)}\nscore {outlier['outlier_score'][r]:.3f}"
                    + (f", {outlier['neighbour_disagreement'][r]:.0%} other" if labels is not None else "")
                    for r in top]
        plots.sample_grid(thumbnail_arrays(dataset, top), captions,
                          f"{title} · highest outlier scores (mean cosine distance to {cfg.metrics.k} nearest)"
                          ).savefig(tracker.path("plots/outliers.png"), dpi=int(cfg.plots.dpi))
    if cfg.plots.map:
        shown = np.sort(order[: int(cfg.plots.map_max_points)])
        note = "" if len(shown) == len(coords) else (
            f"A seeded, class-stratified subsample of {len(shown)} of {len(coords)} points "
            "(plots.map_max_points); neighbours are searched among the points shown.")
        if note:
            log.info("map.html: %s", note)
        found, _ = neighbours.nearest(embeddings[shown], min(k, len(shown) - 1))
        page = interactive.map_html(
            coords[shown], labels[shown] if labels is not None else None, names, indices[shown],
            thumbnail_arrays(dataset, shown, size=40), found, plots.class_colors(len(names) if names else 1),
            title, note)
        tracker.path("map.html").write_text(page, encoding="utf-8")


def _write_matrix(path: Path, matrix: np.ndarray, names: list[str]) -> None:
    import pandas as pd

    pd.DataFrame(matrix, index=names, columns=names).to_csv(path, float_format="%.6g")


def _write_arrays(tracker, embeddings, coords, labels, dataset, names) -> None:
    np.save(tracker.path("arrays/embeddings.npy"), embeddings, allow_pickle=False)  # float32, streamed from the cache
    np.save(tracker.path("arrays/coords.npy"), coords, allow_pickle=False)
    label_array = labels if labels is not None else np.full(len(coords), -1, dtype=np.int64)
    np.save(tracker.path("arrays/labels.npy"), label_array, allow_pickle=False)
    np.save(tracker.path("arrays/indices.npy"), np.asarray(dataset["index"], np.int64), allow_pickle=False)
    tracker.path("arrays/classes.json").write_text(json.dumps(names or []))


def _checked_labels(cfg: DictConfig, dataset, reducer: Reducer):
    """(labels, class names, rows the metrics use) of ``dataset``, after every check the metric and
    reducer settings must pass for its size: one clear line before any extraction."""
    labels, names = data.labels_of(dataset), data.class_names(dataset)
    rows = metric_rows(cfg.metrics.get("max_points"), labels, len(dataset), int(cfg.seed))
    metrics.check(len(rows), None if labels is None else labels[rows], cfg.metrics.k, cfg.metrics.folds)
    check_reducer(reducer, len(dataset))
    return labels, names, rows


def run(cfg: DictConfig) -> dict[str, float]:
    """Load images, extract (or reuse) embeddings, reduce, score, draw and log one run.

    With ``resume=true`` a job whose config (minus ``tracking.RESUME_IGNORES``) already has a
    FINISHED run in the experiment is skipped, and that run's metrics are returned.
    """
    if cfg.get("resume") and not cfg.tracking.enabled:
        raise ConfigError("resume=true matches FINISHED runs in MLflow, but tracking=none: use tracking=mlflow")
    if cfg.get("resume"):
        matched = tracking.finished_run_with(cfg, tracking.config_hash(cfg))
        if matched is not None:
            log.info("resume: skipped, same config as FINISHED run %s", matched.info.run_id)
            return dict(matched.data.metrics)
    artifact_dir, hydra_dir = output_dirs(cfg)
    with tracking.start_run(cfg, artifact_dir, hydra_dir) as tracker:
        check_run_keys(cfg)
        on_error = cfg.dataset.get("on_error", "skip")
        data.check_on_error(on_error)
        source = instantiate_node(cfg.dataset, "dataset")
        dataset = source.load(seed=int(cfg.seed))
        reducer = reducer_settings(cfg.reducer)
        labels, names, scored_rows = _checked_labels(cfg, dataset, reducer)
        backbone = instantiate_node(cfg.model, "model")

        features = cache.embeddings(
            backbone, dataset, layer=cfg.layer, pool=cfg.pool, cache_dir=cfg.cache_dir,
            batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision,
            on_error=on_error,
        )
        embeddings = features.values  # (N, D)
        tracker.log_metrics({"n_skipped": len(features.skipped)})
        if features.skipped:
            log.warning("%d unreadable images skipped (dataset.on_error=skip)", len(features.skipped))
            dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), features.skipped))
            labels, names, scored_rows = _checked_labels(cfg, dataset, reducer)
        tracker.set_tags({"cache": features.status, "cache_key": features.key, "feature": features.feature,
                          "cache_dir": str(Path(cfg.cache_dir).resolve()),
                          "n_images": str(len(dataset)), "embedding_dim": str(embeddings.shape[1]),
                          **depth_tags(features.feature, features.num_layers)})
        log.info("reducing %s embeddings with %s", embeddings.shape, cfg.reducer._target_)
        coords = reduce_to_2d(reducer, embeddings, int(cfg.seed), labels)  # (N, 2)

        if len(scored_rows) < len(dataset):
            log.info("metrics on a seeded, class-stratified sample of %d of %d images (metrics.max_points)",
                     len(scored_rows), len(dataset))
        scores = metrics.score(np.asarray(embeddings[scored_rows]), coords[scored_rows],
                               None if labels is None else labels[scored_rows], k=cfg.metrics.k,
                               folds=cfg.metrics.folds, seed=int(cfg.seed))
        tracker.set_tags({"metrics_points": str(len(scored_rows))})
        tracker.log_metrics(scores)
        log.info("scores: %s", ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
        _write_arrays(tracker, embeddings, coords, labels, dataset, names)
        from latentmap import neighbours

        log.info("outlier scores: %d nearest neighbours of every image (cosine)", int(cfg.metrics.k))
        outlier = neighbours.outlier_scores(*neighbours.nearest(embeddings, int(cfg.metrics.k)), labels)
        for name, values in outlier.items():
            np.save(tracker.path(f"arrays/{name}.npy"), values, allow_pickle=False)
        if cfg.plots.enabled:
            feature = "embed" if cfg.pool == "embed" else f"layer {cfg.layer} {cfg.pool}"
            title = f"{backbone.name} · {feature} · {cfg.reducer._target_.rsplit('.', 1)[-1]}"
            _draw(tracker, cfg, dataset, embeddings, coords, labels, names, title)
            _look_closer(tracker, cfg, dataset, embeddings, coords, labels, names, title, outlier)
    return scores
