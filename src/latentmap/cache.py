"""Content-addressed embedding cache.

An entry is a folder ``<cache_dir>/<key>/`` holding one ``.npy`` per feature (``embed.npy``,
``layer003.cls.npy``, ...) and ``meta.json`` (what the key was made of, the block count, and the
shape and sha256 of every array). The key is the sha256 of: the backbone's identity (kind, name,
weights fingerprint), the dataset's content fingerprint, and the feature-format versions: the
backbone class's ``FEATURE_VERSION`` and :data:`latentmap.extract.FORMAT_VERSION`. Those are
constants bumped on purpose when what a feature means changes; a comment, a new dataset class or
any other edit to the code leaves every entry valid.

Writes are atomic: extraction streams each batch into memory-mapped ``.npy`` files in a temporary
sibling folder, which is renamed into place with ``os.replace`` once complete; a folder without
``meta.json`` is never read, and an array whose size, sha256 or shape differs from ``meta.json``
is never used (the entry is extracted again). Arrays are plain ``.npy``, read memory-mapped with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from latentmap import faults
from latentmap.errors import ConfigError
from latentmap.extract import Extraction
from latentmap.models import file_sha256

log = logging.getLogger(__name__)

def feature_format(backbone) -> dict[str, int]:
    """The versions of what a cached feature means: the backbone class's and extraction's."""
    from latentmap.extract import FORMAT_VERSION

    return {"backbone": type(backbone).FEATURE_VERSION, "extract": FORMAT_VERSION}


def make_key(model_identity: dict[str, Any], dataset_fingerprint: str,
             formats: dict[str, int]) -> tuple[str, dict[str, Any]]:
    """The cache key and the description it hashes (the JSON of the three parts, keys sorted)."""
    description = {
        "model": model_identity,
        "dataset": dataset_fingerprint,
        "format": formats,
    }
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]
    return key, description


class EmbeddingCache:
    """Read and write entries under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _entry(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"cache key must be alphanumeric, got {key!r}")
        return self.root / key

    def meta(self, key: str) -> dict[str, Any] | None:
        """The entry's metadata, or None when there is no complete entry."""
        meta_path = self._entry(key) / "meta.json"
        if not meta_path.is_file():
            return None
        try:
            return json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable cache metadata %s", meta_path)
            return None

    def load(self, key: str, feature: str) -> np.ndarray | None:
        """(N, D) read-only memory-mapped array of one feature, or None when absent or not
        matching its metadata."""
        meta = self.meta(key)
        if meta is None or feature not in meta["arrays"]:
            return None
        path = self._entry(key) / f"{feature}.npy"
        expected = meta["arrays"][feature]
        if not path.is_file() or path.stat().st_size != expected["bytes"]:
            log.warning("cache entry %s/%s is damaged (size); recomputing", key, feature)
            return None
        if file_sha256(path) != expected["sha256"]:
            log.warning("cache entry %s/%s is damaged (checksum); recomputing", key, feature)
            return None
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # read lazily: no copy in memory
        if list(array.shape) != expected["shape"]:
            log.warning("cache entry %s/%s is damaged (shape); recomputing", key, feature)
            return None
        return array

    def lock(self, key: str, timeout: float = 6 * 3600):
        """An inter-process lock for one key (a file lock beside the entry), so that concurrent
        jobs needing the same embeddings extract them once."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f".{self._entry(key).name}.lock"), timeout=timeout)

    def discard(self, key: str) -> None:
        """Remove an entry (a damaged one, before it is written again)."""
        shutil.rmtree(self._entry(key), ignore_errors=True)

    def write(self, key: str, fill: Callable[[Path], Any], meta: dict[str, Any]) -> Path:
        """Write an entry atomically: ``fill(staging)`` writes the ``.npy`` files into a staging
        folder, then their sizes and checksums go into ``meta.json`` and the folder is renamed into
        place. An existing complete entry is kept as it is; a failure leaves nothing behind."""
        final = self._entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        try:
            fill(staging)
            records = {}
            for path in sorted(staging.glob("*.npy")):
                header = np.load(path, mmap_mode="r", allow_pickle=False)
                records[path.stem] = {
                    "shape": list(header.shape),
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                }
                del header
            full_meta = {**meta, "arrays": records}
            (staging / "meta.json").write_text(json.dumps(full_meta, indent=2, sort_keys=True))
            faults.point("cache-write")
            if final.exists():
                if self.meta(key) is not None:
                    return final  # another job finished the same entry first
                shutil.rmtree(final)  # an incomplete leftover
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return final


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
    key, description = entry_key(backbone, dataset, how.precision, how.max_image_pixels)
    with store.lock(key):  # one process extracts a key; the others wait, then read it
        meta = store.meta(key)
        if meta is not None:
            info = LayerInfo(meta["num_layers"], tuple(meta["block_pools"]))
            feature = resolve_feature(layer, pool, info, backbone.name)
            cached = store.load(key, feature)
            if cached is not None:
                _refuse_skipped(meta, how.on_error, key)
                log.info("cache hit %s (%s)", key, feature)
                return Features(cached, "hit", key, feature, info.num_layers, tuple(meta.get("skipped_rows", [])),
                                description["dataset"])
            store.discard(key)  # complete metadata but a missing or damaged array: extract again
        for leftover in store.root.glob(f".tmp-{key}-*"):  # a killed writer's staging folder (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        count = _shard_count(store, key)
        for _ in range(2 if count is not None else 0):  # shard jobs (dataset.shard) did part of it
            missing = [i for i in range(count) if _shards(store, key).meta(_shard_name(i, count)) is None]
            if missing:  # a killed job's slice, or one whose checksum failed at the last try
                info = backbone.load(how.device, how.precision)
                resolve_feature(layer, pool, info, backbone.name)
                log.info("cache %s: %d of %d shards found; extracting the other %d here", key, count - len(missing),
                         count, len(missing))
                for i in missing:
                    _extract_slice(store, key, backbone, dataset, i, count, info, how)
            if _assemble(store, key, count, description, len(dataset)):
                meta = store.meta(key)
                info = LayerInfo(meta["num_layers"], tuple(meta["block_pools"]))
                feature = resolve_feature(layer, pool, info, backbone.name)
                values = store.load(key, feature)
                if values is not None:
                    _refuse_skipped(meta, how.on_error, key)
                    return Features(values, "assembled", key, feature, info.num_layers,
                                    tuple(meta["skipped_rows"]), description["dataset"])
                store.discard(key)
        if count is not None:  # slices that could not be assembled twice over: extract in one piece
            _drop_shards(store, key)
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


def _refuse_skipped(meta: dict[str, Any], on_error: str, key: str) -> None:
    """With ``dataset.on_error=raise``, an entry that skipped unreadable images is refused."""
    if meta.get("skipped_rows") and on_error == "raise":
        raise ConfigError(f"{len(meta['skipped_rows'])} images of this dataset are unreadable (cache entry {key} "
                          "skipped them): fix them, or set dataset.on_error=skip")


def entry_key(backbone, dataset, precision: str, max_image_pixels: int | None) -> tuple[str, dict[str, Any]]:
    """The cache key of ``dataset``'s features by ``backbone`` at ``precision``, and what it hashes."""
    from latentmap import data

    identity = backbone.identity() if precision == "fp32" else {**backbone.identity(), "precision": precision}
    fingerprint = data.fingerprint(dataset)
    if max_image_pixels != data.PIL_MAX_IMAGE_PIXELS:
        fingerprint = f"{fingerprint}|max_image_pixels={max_image_pixels}"
    return make_key(identity, fingerprint, feature_format(backbone))


# Sharded extraction (dataset.shard=i/n): job i extracts rows [i N / n, (i + 1) N / n) of the whole
# dataset into <cache_dir>/<key>-shards/<i>of<n>/, an entry of its own (atomic, with checksums). The
# key is the whole dataset's. Once all n are there, the last shard job (or any later run) copies them,
# in order, into the entry <key>/ with the same meta.json a single process writes, so the arrays and
# their checksums are the ones a one-process extraction gives, and removes the shards.


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


def _shard_name(index: int, count: int) -> str:
    return f"{index}of{count}"


def _shards(store: EmbeddingCache, key: str) -> EmbeddingCache:
    return EmbeddingCache(store.root / f"{key}-shards")


def _drop_shards(store: EmbeddingCache, key: str) -> None:
    """Remove the complete slices of ``key`` (the entry has them all): a writer still busy in its
    staging folder is left to finish, and finds the entry complete."""
    root = _shards(store, key).root
    for folder in root.glob("*of*"):
        if re.fullmatch(r"\d+of\d+", folder.name):
            shutil.rmtree(folder, ignore_errors=True)
    if root.is_dir() and all(path.name.endswith(".lock") for path in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)  # nothing left but the slices' lock files


def _shard_count(store: EmbeddingCache, key: str) -> int | None:
    """n of the complete shards of ``key`` under ``store`` (the most common n), or None when none."""
    names = (path.parent.name for path in _shards(store, key).root.glob("*of*/meta.json"))
    counts = [int(match[2]) for match in map(re.compile(r"(\d+)of(\d+)").fullmatch, names) if match]  # not staging
    return max(set(counts), key=counts.count) if counts else None


def _extract_slice(store: EmbeddingCache, key: str, backbone, dataset, index: int, count: int, info,
                   how: Extraction) -> None:
    """Extract shard ``index`` of ``count`` (the backbone loaded: ``info``) unless it is there."""
    from latentmap.extract import extract

    shards, name = _shards(store, key), _shard_name(index, count)
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


def _assemble(store: EmbeddingCache, key: str, count: int, description: dict[str, Any], n_rows: int) -> bool:
    """Copy the ``count`` shards of ``key``, in order, into the complete entry (checksums verified;
    a damaged shard is removed and False returned); then remove the shards. Call it holding
    ``store.lock(key)``. False when a shard is missing."""
    shards = _shards(store, key)
    names = [_shard_name(i, count) for i in range(count)]
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
    _drop_shards(store, key)
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
    key, description = entry_key(backbone, dataset, how.precision, how.max_image_pixels)
    index, count = shard
    rows = shard_rows(len(dataset), index, count)
    if store.meta(key) is None:
        info = backbone.load(how.device, how.precision)
        resolve_feature(layer, pool, info, backbone.name)  # a bad layer fails before any extraction
        _extract_slice(store, key, backbone, dataset, index, count, info, how)
        with store.lock(key):
            if store.meta(key) is None:
                _assemble(store, key, count, description, len(dataset))
            else:  # a run without dataset.shard extracted it all meanwhile: the slices are surplus
                _drop_shards(store, key)
    else:
        log.info("cache %s is complete already: shard %d/%d has nothing to extract", key, index, count)
        with store.lock(key):
            _drop_shards(store, key)
    complete = store.meta(key) is not None
    present = count if complete else sum(_shards(store, key).meta(_shard_name(i, count)) is not None
                                         for i in range(count))
    return Shard(key, index, count, rows, present, complete)


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
    """Every block's (N, D) features for ``pool``, extracting (once) only on a cache miss."""
    first = embeddings(backbone, dataset, 0, pool, cache_dir, how)
    return block_features(cache_dir, first.key, pool)
