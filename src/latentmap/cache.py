"""Embeddings of a model on a dataset, from the cache or extracted once: every block and pooling of
one forward pass is cached, so a later run at another layer or pooling extracts nothing.

The store (entries, keys, atomic writes, checksums) is :mod:`latentmap.store`; extraction split over
jobs (``dataset.shard``) is :mod:`latentmap.shards`; this module decides which it needs.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentmap.errors import ConfigError
from latentmap.extract import Extraction
from latentmap.shards import assemble, drop_shards, extract_slice, shard_count, shard_name, shard_store
from latentmap.store import EmbeddingCache, entry_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """One feature of a cache entry, and where it came from."""

    values: np.ndarray  # (N, D) float32
    status: str  # "hit" or "miss"
    key: str
    feature: str  # e.g. "embed", "layer003.cls"
    num_layers: int
    skipped: tuple[int, ...] = ()  # dataset rows whose image could not be read (dataset.on_error=skip)
    dataset_fingerprint: str = ""  # data.fingerprint of the images, as the key hashed it


def embeddings(
    backbone,
    dataset,
    layer: int,
    pool: str,
    cache_dir: str | os.PathLike,
    how: Extraction,
) -> Features:
    """The (N, D) features of ``layer``/``pool`` for ``dataset``, from the cache or extracted.

    A miss loads the model, extracts every block and pooling in one pass, and caches them all,
    so a later run at another layer or pooling of the same model and images extracts nothing
    (and loads no model). ``layer`` and ``pool`` are validated before any extraction.
    ``how.max_image_pixels`` (``dataset.max_image_pixels``; None: no limit) is part of the key when
    it is not PIL's default, since it decides which images are read; so is ``how.precision``.
    """
    from latentmap.extract import extract
    from latentmap.models import LayerInfo, resolve_feature

    store = EmbeddingCache(cache_dir)
    key, description = entry_key(backbone, dataset, how.precision, how.max_image_pixels, how.intensity_range)
    with store.lock(key):  # one process extracts a key; the others wait, then read it
        meta = store.meta(key)
        if meta is not None:
            info = LayerInfo(meta["num_layers"], tuple(meta["block_pools"]))
            feature = resolve_feature(layer, pool, info, backbone.name)
            cached = store.load(key, feature)
            if cached is not None:
                _refuse_skipped(meta, how, key, dataset)
                log.info("cache hit %s (%s)", key, feature)
                return Features(cached, "hit", key, feature, info.num_layers, tuple(meta.get("skipped_rows", [])),
                                description["dataset"])
            store.discard(key)  # complete metadata but a missing or damaged array: extract again
        for leftover in store.root.glob(f".tmp-{key}-*"):  # a killed writer's staging folder (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        count = shard_count(store, key)
        for _ in range(2 if count is not None else 0):  # shard jobs (dataset.shard) did part of it
            missing = [i for i in range(count) if shard_store(store, key).meta(shard_name(i, count)) is None]
            if missing:  # a killed job's slice, or one whose checksum failed at the last try
                info = backbone.load(how.device, how.precision)
                resolve_feature(layer, pool, info, backbone.name)
                log.info("cache %s: %d of %d shards found; extracting the other %d here", key, count - len(missing),
                         count, len(missing))
                for i in missing:
                    extract_slice(store, key, backbone, dataset, i, count, info, how)
            if assemble(store, key, count, description, len(dataset)):
                meta = store.meta(key)
                info = LayerInfo(meta["num_layers"], tuple(meta["block_pools"]))
                feature = resolve_feature(layer, pool, info, backbone.name)
                values = store.load(key, feature)
                if values is not None:
                    _refuse_skipped(meta, how, key, dataset)
                    return Features(values, "assembled", key, feature, info.num_layers,
                                    tuple(meta["skipped_rows"]), description["dataset"])
                store.discard(key)
        if count is not None:  # slices that could not be assembled twice over: extract in one piece
            drop_shards(store, key)
        info = backbone.load(how.device, how.precision)
        feature = resolve_feature(layer, pool, info, backbone.name)
        log.info("cache miss %s: extracting %d images with %s on %s (%s)", key, len(dataset), backbone.name,
                 backbone.device, how.precision)
        skipped: list[int] = []  # filled by extract; meta.json is written after it, so it lists them
        store.write(key, lambda staging: extract(backbone, dataset, how, out_dir=staging, skipped=skipped),
                    {**description, "num_layers": info.num_layers, "block_pools": list(info.block_pools),
                     "n_rows": len(dataset), "skipped_rows": skipped})
        values = store.load(key, feature)
        if values is None:
            raise RuntimeError(f"cache entry {key} was written but {feature} cannot be read back")
        return Features(values, "miss", key, feature, info.num_layers, tuple(skipped), description["dataset"])


def _refuse_skipped(meta: dict[str, Any], how, key: str, dataset, shown: int = 3) -> None:
    """With ``dataset.on_error=raise``, an entry that skipped unreadable images is refused, naming
    the first few and why each fails (read again: a few images), as an extraction that meets them does."""
    from latentmap import data
    from latentmap.errors import UnreadableImage

    skipped = meta.get("skipped_rows") or []
    if not skipped or how.on_error != "raise":
        return
    raw = data.undecoded(dataset.select(skipped[:shown]))
    named = []
    for record in raw:
        try:
            data.decode_rgb(record["image"], int(record["index"]), how.max_image_pixels, how.intensity_range)
            named.append(record["image"].get("path") or f"row {record['index']}")
        except UnreadableImage as error:
            named.append(error.what)
        except ConfigError as error:
            named.append(str(error))
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    raise ConfigError(f"{len(skipped)} images of this dataset are unreadable (cache entry {key} skipped them): "
                      f"{'; '.join(named)}{more}. Fix or remove them, or set dataset.on_error=skip")




def block_features(cache_dir: str | os.PathLike, key: str, pool: str) -> list[np.ndarray]:
    """Every block's (N, D) features for ``pool`` from a complete entry, shallowest first."""
    from latentmap.models import feature_name

    store = EmbeddingCache(cache_dir)
    meta = store.meta(key)
    if meta is None:
        raise FileNotFoundError(f"no complete cache entry {key} under {cache_dir}")
    layers = [store.load(key, feature_name(i, pool)) for i in range(meta["num_layers"])]
    if any(layer is None for layer in layers):
        raise FileNotFoundError(f"cache entry {key} lacks pool={pool} for some blocks")
    return layers


def all_blocks(backbone, dataset, pool: str, cache_dir: str | os.PathLike, how: Extraction) -> list[np.ndarray]:
    """Every block's (N, D) features for ``pool``, extracting (once) only on a cache miss: one row
    for each image read (``embeddings(...).skipped`` names the rows left out as unreadable)."""
    first = embeddings(backbone, dataset, 0, pool, cache_dir, how)
    return block_features(cache_dir, first.key, pool)


def common_rows(n_rows: int, skipped: dict[str, tuple[int, ...]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Two models' features of one dataset of ``n_rows`` images, each without the rows it skipped as
    unreadable, compared image by image: the dataset rows every one of them read, and for each the
    positions of those rows in its features (its rows are the dataset's, less its own skipped ones)."""
    every = np.arange(n_rows)
    kept = np.setdiff1d(every, sorted(set().union(*skipped.values())))
    return kept, {side: np.searchsorted(np.setdiff1d(every, rows), kept) for side, rows in skipped.items()}


def say_skipped(tracker, dataset, rows: tuple[int, ...], logger: logging.Logger) -> None:
    """The images skipped as unreadable (``rows`` of ``dataset``): the ``n_skipped`` metric (logged
    only when some were: a constant 0 would crowd MLflow's compare view), ``tables/skipped.csv`` and
    one WARNING line (by ``logger``: the command's own) naming the first few."""
    tracker.log_metrics({"n_skipped": len(rows)})
    files = _write_skipped(tracker, dataset, rows)
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    logger.warning("%d unreadable images skipped (dataset.on_error=skip): %s%s; tables/skipped.csv lists them",
                   len(rows), ", ".join(files[:3]), more)


def _write_skipped(tracker, dataset, rows: tuple[int, ...]) -> list[str]:
    """``tables/skipped.csv`` (index, file) of the images skipped as unreadable, in dataset order,
    from the cache's list of rows, so a cache hit names them as the extraction that skipped them did;
    returns the files (a hub row without a file: ``row <index>``)."""
    import pandas as pd

    from latentmap import data

    chosen = data.undecoded(dataset.select(list(rows)))
    indices = data.column(chosen, "index")
    images = chosen.with_format("arrow")["image"]  # (path, bytes) structs, read as one column
    images = images.combine_chunks() if hasattr(images, "combine_chunks") else images
    paths = images.field("path").to_pylist() if len(images) else []
    present = images.is_valid().to_pylist() if len(images) else []
    files = [str(path) if path and valid else f"row {index}" for path, valid, index in zip(paths, present, indices)]
    pd.DataFrame({"index": indices, "file": files}).to_csv(tracker.path("tables/skipped.csv"), index=False)
    return files
