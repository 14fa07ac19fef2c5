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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from latentmap import faults
from latentmap.config import check_precision
from latentmap.errors import ConfigError, require_int
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
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    on_error: str = "raise",
    max_image_pixels: int | None = 89_478_485,
) -> Features:
    """The (N, D) features of ``layer``/``pool`` for ``dataset``, from the cache or extracted.

    A miss loads the model, extracts every block and pooling in one pass, and caches them all,
    so a later run at another layer or pooling of the same model and images extracts nothing
    (and loads no model). ``layer`` and ``pool`` are validated before any extraction.
    ``max_image_pixels`` (``dataset.max_image_pixels``; None: no limit) is part of the key when it
    is not PIL's default, since it decides which images are read.
    """
    from latentmap import data
    from latentmap.extract import extract
    from latentmap.models import LayerInfo, resolve_feature

    require_int("batch_size", batch_size, 1, "batch_size=64")
    check_precision(precision)
    store = EmbeddingCache(cache_dir)
    identity = backbone.identity() if precision == "fp32" else {**backbone.identity(), "precision": precision}
    fingerprint = data.fingerprint(dataset)
    if max_image_pixels != data.DEFAULT_MAX_IMAGE_PIXELS:
        fingerprint = f"{fingerprint}|max_image_pixels={max_image_pixels}"
    key, description = make_key(identity, fingerprint, feature_format(backbone))
    with store.lock(key):  # one process extracts a key; the others wait, then read it
        meta = store.meta(key)
        if meta is not None:
            info = LayerInfo(meta["num_layers"], tuple(meta["block_pools"]))
            feature = resolve_feature(layer, pool, info, backbone.name)
            cached = store.load(key, feature)
            if cached is not None:
                if meta.get("skipped_rows") and on_error == "raise":
                    raise ConfigError(f"{len(meta['skipped_rows'])} images of this dataset are unreadable (cache "
                                      f"entry {key} skipped them): fix them, or set dataset.on_error=skip")
                log.info("cache hit %s (%s)", key, feature)
                return Features(cached, "hit", key, feature, info.num_layers, tuple(meta.get("skipped_rows", [])),
                                description["dataset"])
            store.discard(key)  # complete metadata but a missing or damaged array: extract again
        for leftover in store.root.glob(f".tmp-{key}-*"):  # a killed writer's staging folder (we hold the lock)
            shutil.rmtree(leftover, ignore_errors=True)
        info = backbone.load(device, precision)
        feature = resolve_feature(layer, pool, info, backbone.name)
        log.info("cache miss %s: extracting %d images with %s on %s (%s)", key, len(dataset), backbone.name,
                 backbone.device, precision)
        skipped: list[int] = []  # filled by extract; meta.json is written after it, so it lists them
        store.write(key, lambda staging: extract(backbone, dataset, batch_size=batch_size, num_workers=num_workers,
                                                 out_dir=staging, on_error=on_error, skipped=skipped,
                                                 max_image_pixels=max_image_pixels),
                    {**description, "num_layers": info.num_layers, "block_pools": list(info.block_pools),
                     "n_rows": len(dataset), "skipped_rows": skipped})
        values = store.load(key, feature)
        if values is None:
            raise RuntimeError(f"cache entry {key} was written but {feature} cannot be read back")
        return Features(values, "miss", key, feature, info.num_layers, tuple(skipped), description["dataset"])


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


def all_blocks(backbone, dataset, pool: str, cache_dir: str | os.PathLike, batch_size: int = 64,
               num_workers: int = 0, device: str = "auto", precision: str = "fp32") -> list[np.ndarray]:
    """Every block's (N, D) features for ``pool``, extracting (once) only on a cache miss."""
    first = embeddings(backbone, dataset, 0, pool, cache_dir, batch_size=batch_size,
                       num_workers=num_workers, device=device, precision=precision)
    return block_features(cache_dir, first.key, pool)
