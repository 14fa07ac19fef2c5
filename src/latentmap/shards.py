"""Sharded extraction (``dataset.shard=i/n``): job i extracts rows [i N / n, (i + 1) N / n) of the
whole dataset into ``<cache_dir>/<key>-shards/<i>of<n>/``, an entry of its own (atomic, with
checksums). The key is the whole dataset's. Once all n are there, the last shard job (or any later
run) copies them, in order, into the entry ``<key>/`` with the same ``meta.json`` a single process
writes, so the arrays and their checksums are the ones a one-process extraction gives, and removes
the shards."""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentmap.errors import ConfigError
from latentmap.extract import Extraction
from latentmap.store import EmbeddingCache, entry_key

log = logging.getLogger(__name__)


def parse_shard(value: Any, n_rows: int | None = None) -> tuple[int, int] | None:
    """``dataset.shard`` ("i/n", 0 <= i < n) as (i, n), or None when not set."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match or not int(match[1]) < int(match[2]):
        raise ConfigError(f"dataset.shard={value!r} must be i/n with 0 <= i < n: the i-th of n slices "
                          "(e.g. dataset.shard=0/4, one job for each of 0/4 ... 3/4)")
    index, count = int(match[1]), int(match[2])
    if n_rows is not None and count > n_rows:
        raise ConfigError(f"dataset.shard={value} splits {n_rows} images into {count} slices: use at most "
                          f"{n_rows} shards")
    return index, count


def shard_rows(n_rows: int, index: int, count: int) -> tuple[int, int]:
    """(first row, end row) of shard ``index`` of ``count``: contiguous, in order, sizes within one."""
    return index * n_rows // count, (index + 1) * n_rows // count


def shard_name(index: int, count: int) -> str:
    return f"{index}of{count}"


def shard_store(store: EmbeddingCache, key: str) -> EmbeddingCache:
    return EmbeddingCache(store.root / f"{key}-shards")


def drop_shards(store: EmbeddingCache, key: str) -> None:
    """Remove the complete slices of ``key`` (the entry has them all): a writer still busy in its
    staging folder is left to finish, and finds the entry complete."""
    root = shard_store(store, key).root
    for folder in root.glob("*of*"):
        if re.fullmatch(r"\d+of\d+", folder.name):
            shutil.rmtree(folder, ignore_errors=True)
    if root.is_dir() and all(path.name.endswith(".lock") for path in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)  # nothing left but the slices' lock files


def shard_count(store: EmbeddingCache, key: str) -> int | None:
    """n of the complete shards of ``key`` under ``store`` (the most common n), or None when none."""
    names = (path.parent.name for path in shard_store(store, key).root.glob("*of*/meta.json"))
    counts = [int(match[2]) for match in map(re.compile(r"(\d+)of(\d+)").fullmatch, names) if match]  # not staging
    return max(set(counts), key=counts.count) if counts else None


def extract_slice(store: EmbeddingCache, key: str, backbone, dataset, index: int, count: int, info,
                   how: Extraction) -> None:
    """Extract shard ``index`` of ``count`` (the backbone loaded: ``info``) unless it is there."""
    from latentmap.extract import extract

    shards, name = shard_store(store, key), shard_name(index, count)
    with shards.lock(name):
        if shards.meta(name) is not None:
            return
        for leftover in shards.root.glob(f".tmp-{name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        first, end = shard_rows(len(dataset), index, count)
        skipped: list[int] = []  # rows of the whole dataset

        def fill(staging: Path) -> None:
            local: list[int] = []
            extract(backbone, dataset.select(range(first, end)), how, out_dir=staging, skipped=local)
            skipped.extend(first + row for row in local)

        log.info("shard %d/%d: extracting rows %d..%d of %d", index, count, first, end - 1, len(dataset))
        shards.write(name, fill, {"rows": [first, end], "skipped_rows": skipped, "num_layers": info.num_layers,
                                  "block_pools": list(info.block_pools)})


def assemble(store: EmbeddingCache, key: str, count: int, description: dict[str, Any], n_rows: int) -> bool:
    """Copy the ``count`` shards of ``key``, in order, into the complete entry (checksums verified;
    a damaged shard is removed and False returned); then remove the shards. Call it holding
    ``store.lock(key)``. False when a shard is missing."""
    shards = shard_store(store, key)
    names = [shard_name(i, count) for i in range(count)]
    metas = [shards.meta(name) for name in names]
    if any(meta is None for meta in metas):
        return False
    features = sorted(metas[0]["arrays"])
    parts = {feature: [shards.load(name, feature) for name in names] for feature in features}
    damaged = {name for feature in features for name, part in zip(names, parts[feature]) if part is None}
    for name in damaged:
        shards.discard(name)
    if damaged:
        return False

    def fill(staging: Path) -> None:
        for feature in features:
            pieces = parts[feature]
            out = np.lib.format.open_memmap(staging / f"{feature}.npy", mode="w+", dtype=np.float32,
                                            shape=(sum(len(p) for p in pieces), pieces[0].shape[1]))
            at = 0
            for piece in pieces:
                for start in range(0, len(piece), 1 << 16):  # bounded memory at any size
                    block = piece[start : start + (1 << 16)]
                    out[at + start : at + start + len(block)] = block
                at += len(piece)
            out.flush()
            del out

    skipped = sorted(row for meta in metas for row in meta["skipped_rows"])
    store.write(key, fill, {**description, "num_layers": metas[0]["num_layers"],
                            "block_pools": metas[0]["block_pools"], "n_rows": n_rows, "skipped_rows": skipped})
    drop_shards(store, key)
    log.info("cache %s: assembled from %d shards", key, count)
    return True


@dataclass(frozen=True)
class Shard:
    """What one shard job did."""

    key: str
    index: int
    count: int
    rows: tuple[int, int]  # (first, end) rows of the whole dataset
    present: int  # shards extracted so far (count once the entry is assembled)
    complete: bool  # the whole entry is in the cache (assembled now or before)


def extract_shard(backbone, dataset, shard: tuple[int, int], layer: int, pool: str, cache_dir: str | os.PathLike,
                  how: Extraction) -> Shard:
    """Extract shard ``shard`` = (i, n) of ``dataset`` into the cache (unless the whole entry or this
    shard is there already), then assemble the entry when all n shards are present."""
    from latentmap.models import resolve_feature

    store = EmbeddingCache(cache_dir)
    key, description = entry_key(backbone, dataset, how.precision, how.max_image_pixels, how.intensity_range)
    index, count = shard
    rows = shard_rows(len(dataset), index, count)
    if store.meta(key) is None:
        info = backbone.load(how.device, how.precision)
        resolve_feature(layer, pool, info, backbone.name)  # a bad layer fails before any extraction
        extract_slice(store, key, backbone, dataset, index, count, info, how)
        with store.lock(key):
            if store.meta(key) is None:
                assemble(store, key, count, description, len(dataset))
            else:  # a run without dataset.shard extracted it all meanwhile: the slices are surplus
                drop_shards(store, key)
    else:
        log.info("cache %s is complete already: shard %d/%d has nothing to extract", key, index, count)
        with store.lock(key):
            drop_shards(store, key)
    complete = store.meta(key) is not None
    present = count if complete else sum(shard_store(store, key).meta(shard_name(i, count)) is not None
                                         for i in range(count))
    return Shard(key, index, count, rows, present, complete)
