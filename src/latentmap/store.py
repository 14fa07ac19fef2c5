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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from latentmap import faults
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


def entry_key(backbone, dataset, precision: str, max_image_pixels: int | None,
              intensity_range: tuple[float, float] | None = None) -> tuple[str, dict[str, Any]]:
    """The cache key of ``dataset``'s features by ``backbone`` at ``precision``, and what it hashes
    (with the pixel limit and the wide images' range where they are not the defaults)."""
    from latentmap import data

    identity = backbone.identity() if precision == "fp32" else {**backbone.identity(), "precision": precision}
    fingerprint = data.fingerprint(dataset)
    if max_image_pixels != data.PIL_MAX_IMAGE_PIXELS:
        fingerprint = f"{fingerprint}|max_image_pixels={max_image_pixels}"
    if intensity_range is not None:
        fingerprint = f"{fingerprint}|intensity_range={list(intensity_range)}"
    return make_key(identity, fingerprint, feature_format(backbone))
