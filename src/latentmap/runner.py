"""The story of one run: config in, scores out, all of it logged. Nothing else imports from here."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from latentmap import (
    audit,
    cache,
    data,
    figures,
    metrics,
    neighbours,
    progress,
    reduce,
    resampling,
    settings,
    shards,
    stats,
    zeroshot,
)
from latentmap.config import instantiate_node
from latentmap.errors import ConfigError, rename_keys
from latentmap.extract import Extraction
from latentmap.models import depth_tags
from latentmap.task import tracked_task
from latentmap.tracking import Tracker
from latentmap.tracking.run import HEADLINE

log = logging.getLogger(__name__)


def _checked_labels(cfg: DictConfig, dataset, reducer: reduce.Reducer):
    """(labels, class names, rows the metrics use) of ``dataset``, after every check the metric and
    reducer settings must pass for its size: one clear line before any extraction."""
    labels, names = data.labels_of(dataset), data.class_names(dataset)
    rows = metrics.scored_rows(cfg.metrics.max_points, labels, len(dataset), int(cfg.data_seed))
    metrics.check(len(rows), None if labels is None else labels[rows], cfg.metrics.k, cfg.metrics.folds,
                  capped_by="metrics.max_points" if len(rows) < len(dataset) else None,
                  halves=int(cfg.metrics.bootstrap), names=names)
    reduce.check(reducer, len(dataset))
    if int(cfg.metrics.bootstrap):  # each half-sample's map is fitted on its images alone
        half = int(resampling.halves(None if labels is None else labels[rows], len(rows), 1, 0).members[0].sum())
        if int(cfg.metrics.k) >= half / 2:  # the run's values stand; their intervals cannot be computed
            log.warning("metrics.k=%d is too large for the half-samples of %d images the intervals recompute on "
                        "(trustworthiness and continuity need k < %g there): they will have no interval; use "
                        "metrics.k<=%d for intervals, or more images", int(cfg.metrics.k), half, half / 2,
                        max(1, (half - 1) // 2))
        chosen = cfg.metrics.get("refit_map")
        if refits_map(cfg, len(rows)):
            try:
                reduce.check(reducer, half)
            except ConfigError as error:
                if chosen:  # asked for: a reducer that cannot fit half the images is a mistake
                    raise ConfigError(f"metrics.refit_map fits the map again on half-samples of {half} images, "
                                      f"and {error} (or metrics.refit_map=false holds the run's map fixed)") from None
                log.info("metrics.refit_map=null: the 2-D map is held fixed on the half-samples, whose %d images "
                         "are too few for this reducer's settings (%s)", half, error)
    return labels, names, rows


def _score(cfg: DictConfig, embeddings: np.ndarray, maps: list[np.ndarray], labels: np.ndarray | None,
           tracker: Tracker) -> tuple[dict[str, stats.Interval], resampling.Evaluation, resampling.Halves]:
    """Every metric with its interval: the metrics on the scored images and on ``metrics.bootstrap``
    half-samples (:mod:`latentmap.resampling`), plus RankMe (no interval). With several fits of the
    map (reducer.repeats), a map metric is its mean over the fits, and each fit's value
    (``<metric>_fit``, one step a fit) and their standard deviation (``<metric>_std``) are logged."""
    k, folds, seed, distance = int(cfg.metrics.k), int(cfg.metrics.folds), int(cfg.cv_seed), str(cfg.metrics.distance)
    metrics.check(len(embeddings), labels, k, folds)
    if labels is None:
        log.info("unlabelled dataset: skipping %s", ", ".join(metrics.LABEL_METRICS))
    halves = resampling.halves(labels, len(embeddings), int(cfg.metrics.bootstrap), seed)
    space = metrics.embedding_space(embeddings, distance)  # (N, D) as the geometry sees them
    rankme = stats.effective_rank(space)
    refit = _map_refit(cfg, space, labels, halves)  # which keeps the space only where it refits
    del space
    evaluation = resampling.evaluate(
        embeddings, maps, labels, halves, k=k, folds=folds, seed=seed, distance=distance,
        weighted_k=int(cfg.metrics.knn_weighted_k), temperature=float(cfg.metrics.knn_temperature),
        probe=bool(cfg.metrics.probe), refit=refit)
    if len(maps) > 1:
        for fit in range(len(maps)):
            tracker.log_metrics({f"{name}_fit": values[fit] for name, values in evaluation.fits.items()}, step=fit)
        tracker.log_metrics({f"{name}_std": float(np.std(values, ddof=1)) for name, values in evaluation.fits.items()})
    found = resampling.intervals(evaluation, halves, float(cfg.metrics.confidence))
    if "probe_balanced_acc" in found and labels is not None and halves.count:
        counts = np.bincount(labels)
        smallest, largest = int(counts[counts > 0].min()), int(counts.max())
        if resampling.balanced_undercovers(smallest, largest):
            log.warning("probe_balanced_acc: the smallest class has %d scored images, the largest %d; on a long tail "
                        "of classes this small its interval covered 89-93%% of the time where 95%% was asked, and two "
                        "equal runs were called different in 6-12%% (docs/calibration.md, a long tail of classes): "
                        "read its interval as too narrow", smallest, largest)
    found["rankme"] = stats.Interval(rankme, float("nan"), float("nan"), len(embeddings),
                                     "none: a subsample's spectrum is flatter, so resampling cannot cover it")
    order = [*metrics.ORDER, *stats.GEOMETRY_METRICS]
    return {name: found[name] for name in order if name in found}, evaluation, halves


def refits_map(cfg: DictConfig, scored: int, half: int | None = None) -> bool:
    """Whether the half-samples' map metrics come from maps refitted on each half (``metrics.refit_map``;
    null: for PCA, whose fit costs little, and for other reducers on at most :data:`latentmap.settings.REFIT_MAPS_UP_TO`
    ``scored`` images; and, given the ``half``-samples' size, only where the reducer's settings allow a
    fit on that many images: the default does not fail a run that ``true`` would)."""
    chosen = cfg.metrics.get("refit_map")
    if chosen is not None:
        return bool(chosen)
    if cfg.reducer._target_ != "sklearn.decomposition.PCA" and scored > settings.REFIT_MAPS_UP_TO:
        return False
    if half is not None:
        try:
            reduce.check(reduce.build(cfg.reducer), half)
        except ConfigError:
            return False
    return True


def _map_refit(cfg: DictConfig, space: np.ndarray, labels: np.ndarray | None, halves: resampling.Halves):
    """``refit(rows, fit)``: the run's reducer fitted again, as it was fitted on every image, on the
    scored images ``rows`` of ``space`` (the scored embeddings as the geometry sees them; its fit-th
    repeat's seed), or None when the map is held fixed. The half's size was checked before
    extraction (:func:`_checked_labels`)."""
    if not halves.count or not refits_map(cfg, len(space), int(halves.members[0].sum())):
        return None
    seed = int(cfg.reducer_seed)

    def refit(rows: np.ndarray, fit: int) -> np.ndarray:
        with contextlib.closing(each([rows], fit)) as fits:
            return next(fits)

    def each(rows: list[np.ndarray], fit: int) -> Iterator[np.ndarray]:
        """``refit(r, fit)`` for each ``r`` of ``rows``, in order: side by side where the reducer
        allows (:func:`latentmap.reduce.to_2d_each`)."""
        reducer_log = logging.getLogger(reduce.__name__)
        level = reducer_log.level
        reducer_log.setLevel(logging.WARNING)  # not "fitting ..." once a half-sample (set here, not in the threads)
        try:
            def data(i: int) -> tuple[np.ndarray, int, np.ndarray | None]:
                return space[rows[i]], seed + fit, None if labels is None else labels[rows[i]]

            fits = reduce.to_2d_each(lambda _: reduce.build(cfg.reducer, fit), len(rows), data,
                                     max((len(r) for r in rows), default=0))
            try:
                yield from fits
            finally:
                fits.close()  # the fits' threads ended, and what they set up undone, before the level is put back
        finally:
            reducer_log.setLevel(level)

    refit.each = each
    return refit


def _write_score_tables(tracker: Tracker, found: dict[str, stats.Interval], evaluation: resampling.Evaluation,
                        halves: resampling.Halves, indices: np.ndarray, labels: np.ndarray | None) -> None:
    """``tables/metrics.csv`` (metric, value, lo, hi, n, method), ``tables/per_image.csv`` (index,
    label, one column of scores per metric) of the scored images, and ``tables/halves.csv`` (each
    metric on each half-sample: what compare.py pairs two runs on)."""
    import pandas as pd

    pd.DataFrame([{"metric": name, "value": ci.value, "lo": ci.lo, "hi": ci.hi, "n": ci.n, "method": ci.method}
                  for name, ci in found.items()]).to_csv(tracker.path("tables/metrics.csv"), index=False)
    per_image = {name: values for name, values in evaluation.per_image.items() if name in metrics.ORDER}
    table = pd.DataFrame({"index": indices, "label": labels if labels is not None else np.full(len(indices), -1),
                          **per_image})
    table.to_csv(tracker.path("tables/per_image.csv"), index=False, float_format="%.9g")
    if halves.count:
        pd.DataFrame({"half": np.arange(halves.count), **evaluation.resampled}).to_csv(
            tracker.path("tables/halves.csv"), index=False, float_format="%.12g")


def _log_bounds(tracker: Tracker, found: dict[str, stats.Interval], resamples: int) -> None:
    """Each interval's ends as ``<metric>_lo`` and ``<metric>_hi`` (none without resamples, or where
    an interval is undefined)."""
    if resamples:
        tracker.log_metrics({f"{name}_{side}": getattr(ci, side) for name, ci in found.items() for side in ("lo", "hi")
                             if not np.isnan(getattr(ci, side))})


def _log_neighbour_search(tracker: Tracker, found: neighbours.Neighbours, resamples: int, confidence: float,
                          seed: int) -> None:
    """Tag how every image's neighbours were found; for an approximate index, log its measured
    recall (``neighbour_recall``, with its bootstrap interval over the sampled queries) and the
    outlier score's mean relative excess over the exact one (``neighbour_distance_error``)."""
    tracker.set_tags({"neighbour_search": found.method})
    if found.recall is None:
        return
    measured = stats.intervals({"neighbour_recall": found.recall, "neighbour_distance_error": found.distance_error},
                               resamples, confidence, seed)
    tracker.log_metrics({name: ci.value for name, ci in measured.items()})
    _log_bounds(tracker, measured, resamples)
    recall = measured["neighbour_recall"]
    log.info("approximate neighbours (%s): recall %.3f [%.3f, %.3f] on %d sampled images; their mean "
             "distance %.2f%% above the exact one", found.method, recall.value, recall.lo, recall.hi, len(found.recall),
             100 * measured["neighbour_distance_error"].value)


class Laps:
    """Wall time of a run's stages: ``lap(name)`` closes the stage that began at the previous lap."""

    def __init__(self) -> None:
        self.last, self.seconds = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        from latentmap import stopping

        stopping.raise_if_terminated()  # a SIGTERM Python dropped mid-stage stops the run here
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now


@dataclass
class Prepared:
    """What :func:`prepare` checked and loaded before the MLflow run exists."""

    dataset: Any
    reducer: reduce.Reducer
    labels: np.ndarray | None
    names: list[str] | None
    scored_rows: np.ndarray
    backbone: Any
    how: Extraction  # batch size, device, precision, on_error, max_image_pixels
    shard: tuple[int, int] | None = None  # dataset.shard: extract this slice only
    against: Any = None  # audit.against: the second image set, loaded


def prepare(cfg: DictConfig) -> Prepared:
    """Every check a user's mistake can fail before any work: the device, the dataset's settings, that it holds
    readable images, the metric and reducer settings for its size, and the model's config. A failure
    is one ConfigError line and no MLflow run."""
    from latentmap.models.base import auto_device

    how = Extraction.of(cfg)
    auto_device(str(cfg.device))  # device=cuda without CUDA: one line here, not a FAILED run later
    dataset = instantiate_node(cfg.dataset, "dataset").load(seed=int(cfg.data_seed))
    data.check_readable(dataset, how.max_image_pixels, how.intensity_range)
    reducer = reduce.build(cfg.reducer)
    labels, names, scored_rows = _checked_labels(cfg, dataset, reducer)
    size = cfg.audit.min_cluster_size
    if cfg.audit.enabled and cfg.audit.clusters and size is not None and int(size) > len(scored_rows):
        raise ConfigError(f"audit.min_cluster_size={size} is larger than the N={len(scored_rows)} scored images "
                          f"HDBSCAN clusters: use audit.min_cluster_size<={len(scored_rows)}, or null (1% of them, "
                          "at least 5)")
    backbone = instantiate_node(cfg.model, "model")
    shard = shards.parse_shard(cfg.dataset.shard, len(dataset))
    against = _against(cfg) if cfg.audit.enabled and cfg.audit.against is not None else None
    if not cfg.audit.enabled and cfg.audit.against is not None:  # it was skipped without a word
        log.warning("audit.against=%s is not checked for leakage: audit.enabled=false turns the audit off",
                    cfg.audit.against)
    return Prepared(dataset, reducer, labels, names, scored_rows, backbone, how, shard, against)


def _against(cfg: DictConfig):
    """``audit.against``'s images: an image folder's path or a dataset config, loaded and checked."""
    from omegaconf import OmegaConf

    node = cfg.audit.against
    path_only = isinstance(node, str)
    if path_only:
        node = OmegaConf.create({"_target_": "latentmap.data.ImageFolderSource", "path": node})
    try:
        other = instantiate_node(node, "audit.against").load(seed=int(cfg.data_seed))
    except ConfigError as error:  # a source names its keys as dataset.<key>: here they are audit.against's
        message = rename_keys(str(error), {"dataset.path=": "audit.against="}) if path_only else str(error)
        raise ConfigError(rename_keys(message, {"dataset.": "audit.against."})) from error
    try:  # its images are read under dataset.max_image_pixels: only the folder to point elsewhere is its own
        data.check_readable(other, cfg.dataset.max_image_pixels, data.intensity_of(cfg.dataset))
    except ConfigError as error:
        where = "audit.against" if path_only else "audit.against.path (or audit.against.name)"
        raise ConfigError(str(error).replace("Point dataset.path (or dataset.name) at", f"Point {where} at")) from error
    return other


def _extract_shard(cfg: DictConfig, tracker: Tracker, prepared: Prepared) -> dict[str, float]:
    """A shard job (``dataset.shard=i/n``): extract slice i of n into the cache, assembling the whole
    entry when it is the last; no map, no metrics. Its run is tagged with the slice and the key."""
    done = shards.extract_shard(prepared.backbone, prepared.dataset, prepared.shard, cfg.layer, cfg.pool,
                               cfg.cache_dir, prepared.how)
    first, end = done.rows
    tracker.set_tags({"shard": f"{done.index}/{done.count}", "shard_rows": f"{first}..{end - 1}",
                      "cache_key": done.key, "cache": "complete" if done.complete else "shard",
                      "cache_dir": str(Path(cfg.cache_dir).resolve()), "n_images": str(len(prepared.dataset))})
    if done.complete:
        log.info("shard %d/%d done: the cache entry %s is complete; run without dataset.shard to map it",
                 done.index, done.count, done.key)
    else:
        log.info("shard %d/%d done (rows %d..%d): %d of %d shards in the cache; the last one to finish, or any "
                 "run without dataset.shard, assembles the entry", done.index, done.count, first, end - 1,
                 done.present, done.count)
    return {}


def describe(cfg: DictConfig) -> dict[str, str]:
    """What the run is, by the config key each part states: ``{"model": "mobilenet_v2", "layer":
    "layer 3", "pool": "mean", "reducer": "UMAP"}`` (an embed run has no layer part); a shard job's:
    ``{"model": ..., "dataset": "extract shard 1/4"}``. The run's name joins them, what a sweep
    varies first (:func:`latentmap.tracking.run.run_name`)."""
    model = model_name(cfg)
    if cfg.dataset.get("shard") is not None:
        return {"model": model, "dataset": f"extract shard {cfg.dataset.shard}"}
    layer = {} if cfg.pool == "embed" else {"layer": f"layer {cfg.layer}"}
    return {"model": model, **layer, "pool": str(cfg.pool), "reducer": cfg.reducer._target_.rsplit(".", 1)[-1]}


def model_name(cfg: DictConfig) -> str:
    """The model as a reader names it: its name's last part (a hub id's or a folder's), else its class."""
    return Path(str(cfg.model.get("name") or cfg.model._target_.rsplit(".", 1)[-1])).name


def _dataset_input(cfg: DictConfig, features: cache.Features, n_rows: int, names: list[str] | None):
    """(name, digest, source, profile) of the run's images, for :meth:`Tracker.log_dataset`."""
    node = cfg.dataset
    where = node.get("path") or node.get("name") or node._target_.rsplit(".", 1)[-1].removesuffix("Source").lower()
    name = Path(str(where)).name if node.get("path") else str(where)
    if node.get("split"):
        name += f" [{node.split}]"
    source = {key: node[key] for key in ("path", "name", "split", "revision", "limit", "part")
              if node.get(key) is not None}
    profile = {"images": n_rows, "classes": len(names) if names else 0}
    return name, features.dataset_fingerprint, source, profile


def _zeroshot(cfg: DictConfig, tracker: Tracker, prepared: Prepared, dataset, backbone, features, scored_rows,
              labels, names, halves) -> zeroshot.ZeroShot | None:
    """Zero-shot classification by the model's text tower (:mod:`latentmap.zeroshot`) on the scored
    images: its scores and intervals, per-class table and prompts logged; None, with one log line,
    for an image-only model or unlabelled images."""
    templates = [str(t) for t in cfg.zeroshot.templates]
    texts = zeroshot.prompts(templates, names) if labels is not None else []
    text = zeroshot.text_embeddings(backbone, texts, cfg.cache_dir) if texts and hasattr(backbone, "text_family") \
        else None
    if text is None:
        image_only = not getattr(backbone, "has_text_config", lambda: False)()
        log.info("zero-shot: skipped, %s", "the images have no labels" if labels is None else
                 f"{backbone.name} has no text tower (an image-only model)" if image_only else
                 f"{backbone.name}'s text tower cannot be used (the warning above says why)")
        return None
    if features.feature == "embed":
        images = np.asarray(features.values)
    else:  # the joint space is the final embed: the run reads another layer or pool
        images = np.asarray(cache.embeddings(backbone, dataset, -1, "embed", cfg.cache_dir, prepared.how).values)
    found = zeroshot.evaluate(images[scored_rows], labels[scored_rows], names, templates, text.embeddings, text.scale,
                              text.bias, halves.members, halves.scale, float(cfg.metrics.confidence))
    found.per_class.to_csv(tracker.path("tables/zeroshot_per_class.csv"), index=False)
    found.prompts.to_csv(tracker.path("tables/zeroshot_prompts.csv"), index=False)
    tracker.set_tags({"zeroshot_prompts": str(len(texts)), "zeroshot_text_cache": text.cache})
    tracker.log_metrics({name: ci.value for name, ci in found.scores.items()})
    _log_bounds(tracker, found.scores, halves.count)
    log.info("zero-shot (%d prompts, %d templates a class; text cache %s): %s", len(texts), len(templates),
             text.cache, ", ".join(f"{name}={ci}" for name, ci in found.scores.items()))
    return found


def _place_text(tracker: Tracker, fitted: reduce.Reducer, found: zeroshot.ZeroShot, feature: str, names: list[str],
                distance: str) -> list[tuple[str, float, float]] | None:
    """Each class's prompt embedding placed in the run's map (tables/zeroshot_text_coords.csv), when
    the map is of the joint space (``pool=embed``) and its reducer can place new points."""
    if feature != "embed":
        log.info("zero-shot: the class prompts are not placed in the map: it maps %s, not the joint "
                 "image-text space (pool=embed)", feature)
        return None
    placed = fitted.place(metrics.embedding_space(found.classes.astype(np.float32), distance))
    if placed is None:
        log.info("zero-shot: %s cannot place new points, so the class prompts are not in the map", fitted.target)
        return None
    import pandas as pd

    pd.DataFrame({"class": names, "x": placed[:, 0], "y": placed[:, 1]}).to_csv(
        tracker.path("tables/zeroshot_text_coords.csv"), index=False)
    return [(name, float(x), float(y)) for name, (x, y) in zip(names, placed)]


def _audit(cfg: DictConfig, tracker: Tracker, prepared: Prepared, dataset, backbone, space: np.ndarray,
           scored_rows: np.ndarray, labels, names, evaluation, halves, found_neighbours, held_out,
           hashes: audit.FileHashes | None = None) -> audit.Audit:
    """The data audit (:mod:`latentmap.audit`): its tables, counts and cluster scores logged, its notes
    in the log, its figures drawn (:func:`latentmap.figures.draw_audit`)."""
    other = None
    if prepared.against is not None:
        found = cache.embeddings(backbone, prepared.against, cfg.layer, cfg.pool, cfg.cache_dir, prepared.how)
        other = (metrics.embedding_space(np.asarray(found.values), str(cfg.metrics.distance)),
                 data.column(prepared.against, "index"), audit.file_paths(prepared.against))
    audited = audit.run(cfg.audit, dataset=dataset, space=space, scored_rows=scored_rows, labels=labels, names=names,
                        evaluation=evaluation, halves=halves, neighbour_rows=found_neighbours.indices,
                        neighbour_distances=found_neighbours.distances, held_out=held_out,
                        confidence=float(cfg.metrics.confidence), seed=int(cfg.cv_seed),
                        distance=str(cfg.metrics.distance), other=other, hashes=hashes)
    for name, table in audited.tables.items():
        table.to_csv(tracker.path(f"tables/{name}.csv"), index=name == "confusion")
    tracker.log_metrics({**audited.counts, **{name: ci.value for name, ci in audited.scores.items()}})
    _log_bounds(tracker, audited.scores, halves.count)
    for note in audited.notes:
        log.info("audit: %s", note)
    if audited.scores:
        log.info("clusters: %s", ", ".join(f"{name}={ci}" for name, ci in audited.scores.items()))
    if cfg.plots.enabled:
        figures.draw_audit(tracker, cfg, dataset, audited, names)
    return audited


@tracked_task(prepare=prepare, describe=describe)
def run(cfg: DictConfig, tracker: Tracker, prepared: Prepared) -> dict[str, float]:
    """Extract (or reuse) embeddings of the prepared images, reduce, score, draw and log one run."""
    dataset, reducer, backbone = prepared.dataset, prepared.reducer, prepared.backbone
    labels, names, scored_rows = prepared.labels, prepared.names, prepared.scored_rows
    if prepared.shard is not None:
        return _extract_shard(cfg, tracker, prepared)
    laps = Laps()
    features = cache.embeddings(backbone, dataset, cfg.layer, cfg.pool, cfg.cache_dir, prepared.how)
    embeddings = features.values  # (N, D)
    laps.lap("extract")
    held_out = (audit.held_out_rows(cfg.dataset, labels, len(dataset), int(cfg.data_seed))
                if cfg.audit.enabled and labels is not None else None)
    if features.skipped:
        cache.say_skipped(tracker, dataset, features.skipped, log)
        dataset = dataset.select(np.setdiff1d(np.arange(len(dataset)), features.skipped))
        had = set(np.unique(labels).tolist()) if labels is not None else set()  # a class a slice left empty: not news
        labels, names, scored_rows = _checked_labels(cfg, dataset, reducer)
        kept = set(np.unique(labels).tolist()) if labels is not None else set()
        gone = [str(n) for c, n in enumerate(names or []) if c in had and c not in kept]
        if gone:
            log.warning("class%s %s lost every image to the skipped ones: %s no row in tables/per_class.csv and no "
                        "point in any plot", "es" if len(gone) > 1 else "", ", ".join(gone[:8]) +
                        (", ..." if len(gone) > 8 else ""), "they have" if len(gone) > 1 else "it has")
        if held_out is not None:
            held_out = np.delete(held_out, features.skipped)
    tracker.log_dataset(*_dataset_input(cfg, features, len(dataset), names))
    indices = data.column(dataset, "index")  # each row's dataset index, read once
    tracker.set_tags({"model": str(cfg.model.get("name") or cfg.model._target_),
                      "reducer": str(cfg.reducer._target_).rsplit(".", 1)[-1],
                      "cache": features.status, "cache_key": features.key, "feature": features.feature,
                      "dataset_fingerprint": features.dataset_fingerprint,
                      "cache_dir": str(Path(cfg.cache_dir).resolve()),
                      "n_images": str(len(dataset)), "embedding_dim": str(embeddings.shape[1]),
                      **depth_tags(features.feature, features.num_layers)})

    # The duplicates' content hashes, read beside the next stages (UMAP's fit runs on one core).
    hashes = audit.FileHashes(dataset) if cfg.audit.enabled and cfg.audit.duplicates else None
    log.info("reducing %s embeddings with %s", embeddings.shape, cfg.reducer._target_)
    distance = str(cfg.metrics.distance)  # the embedding space's one geometry
    space = metrics.embedding_space(embeddings, distance)  # (N, D) as the geometry sees them
    metrics.check_spread(space, f"{backbone.name} · {features.feature}")
    reducer_name = cfg.reducer._target_.rsplit(".", 1)[-1]
    with progress.working(f"fitting {reducer_name} on {embeddings.shape[0]:,} x {embeddings.shape[1]:,}"):
        maps, fitted = reduce.fitted_maps(cfg.reducer, space, int(cfg.reducer_seed), labels)  # repeats x (N, 2)
    coords = maps[0]  # the plotted map
    laps.lap("reduce")

    if len(scored_rows) < len(dataset):
        log.info("metrics on a seeded, class-stratified sample of %d of %d images (metrics.max_points)",
                 len(scored_rows), len(dataset))
    log.info("metrics and their intervals on %d images (%d half-samples)", len(scored_rows),
             int(cfg.metrics.bootstrap))
    with progress.working("metrics and intervals"):
        found, evaluation, halves = _score(cfg, np.asarray(embeddings[scored_rows]), [m[scored_rows] for m in maps],
                                           None if labels is None else labels[scored_rows], tracker)
    resamples = halves.count
    scores = {name: ci.value for name, ci in found.items()}
    tracker.set_tags({"metrics_points": str(len(scored_rows)), "halves": str(halves.count),
                      **({"halves_digest": halves.digest, "halves_scale": f"{halves.scale:.12g}",
                          "map_refit": str(evaluation.map_refitted).lower()} if halves.count else {})})
    # The headline metrics first: MLflow's compare view plots the first metric a run logged.
    tracker.log_metrics({**{m: scores[m] for m in HEADLINE if m in scores}, **scores})
    _log_bounds(tracker, found, resamples)
    log.info("scores: %s", ", ".join(f"{k}={ci}" for k, ci in found.items()))
    _write_score_tables(tracker, found, evaluation, halves, indices[scored_rows],
                        None if labels is None else labels[scored_rows])
    laps.lap("metrics")

    log.info("outlier scores: %d nearest neighbours of every image (%s)", int(cfg.metrics.k), distance)
    with progress.working("nearest neighbours"):
        found_neighbours = neighbours.every_nearest(space, int(cfg.metrics.k), distance,
                                                    neighbours.exact_limit(cfg.metrics), int(cfg.cv_seed),
                                                    neighbours.search_for(cfg.reducer))
    _log_neighbour_search(tracker, found_neighbours, resamples, float(cfg.metrics.confidence), int(cfg.cv_seed))
    outlier = neighbours.outlier_scores(found_neighbours.indices, found_neighbours.distances, labels)
    laps.lap("neighbours")
    audited = None
    if cfg.audit.enabled:
        with progress.working("data audit"):
            audited = _audit(cfg, tracker, prepared, dataset, backbone, space, scored_rows, labels, names,
                             evaluation, halves, found_neighbours, held_out, hashes)
        laps.lap("audit")
    texts = None  # the class prompts' places in the map, for map.html
    if cfg.zeroshot.enabled:
        with progress.working("zero-shot classification"):
            zeroshot_found = _zeroshot(cfg, tracker, prepared, dataset, backbone, features, scored_rows, labels, names,
                                       halves)
        if zeroshot_found is not None:  # a stage time only where it ran (not for image-only models)
            scores.update({name: ci.value for name, ci in zeroshot_found.scores.items()})
            texts = _place_text(tracker, fitted, zeroshot_found, features.feature, names, distance)
            laps.lap("zeroshot")
    del space
    tracker.save_arrays({
        "embeddings": embeddings,  # float32, streamed from the cache
        "coords": coords,
        "labels": labels if labels is not None else np.full(len(coords), -1, dtype=np.int64),
        "indices": indices,
        **outlier,
        **({f"audit_{name}": values for name, values in audited.per_image.items()} if audited else {}),
    })
    tracker.path("arrays/classes.json").write_text(json.dumps(names or []))
    laps.lap("arrays")
    if cfg.plots.enabled:
        feature = "embed" if cfg.pool == "embed" else f"layer {cfg.layer} {cfg.pool}"
        space_title = f"{backbone.name} · {feature}"
        title = f"{space_title} · {cfg.reducer._target_.rsplit('.', 1)[-1]}"
        figures.draw_all(tracker, cfg, dataset, embeddings, coords, labels, names, title, outlier, space_title,
                         audited.per_image if audited else None, texts, lambda: laps.lap("plots"))
        if cfg.plots.map:
            laps.lap("map")
    # Each stage's wall time (time_<stage>_s): where a large run spends it, comparable across runs.
    tracker.log_metrics({f"time_{stage}_s": seconds for stage, seconds in laps.seconds.items()})
    log.info("stages: %s", ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in laps.seconds.items()))
    return scores
