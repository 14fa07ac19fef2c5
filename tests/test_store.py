"""The embedding store: what a key is made of, atomic entries, and a folder it never writes outside."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from latentmap import data, store
from latentmap.models import PixelsBackbone

from helpers import cache_entries


@pytest.fixture
def images(class_folder):
    return data.ImageFolderSource(path=str(class_folder)).load(seed=0)


def test_the_key_is_the_hash_of_model_dataset_and_format_versions_only(images):
    backbone = PixelsBackbone(size=8)
    formats = store.feature_format(backbone)
    assert formats == {"backbone": PixelsBackbone.FEATURE_VERSION, "extract": 4}  # FORMAT_VERSION: bumped on purpose
    key, description = store.make_key(backbone.identity(), data.fingerprint(images), formats)
    expected = {"model": {"kind": "pixels", "size": 8}, "dataset": data.fingerprint(images), "format": formats}
    assert description == expected
    assert key == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:32]


def test_a_failed_write_leaves_nothing_and_a_complete_entry_is_kept(tmp_path):
    entries = store.EmbeddingCache(tmp_path)

    def broken(staging):
        np.save(staging / "embed.npy", np.zeros((2, 2), np.float32))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        entries.write("abc", broken, {})
    assert cache_entries(tmp_path) == [] and entries.meta("abc") is None
    entries.write("abc", lambda staging: np.save(staging / "embed.npy", np.ones((2, 2), np.float32)), {"n": 1})
    meta = entries.meta("abc")
    assert meta["n"] == 1 and meta["arrays"]["embed"]["shape"] == [2, 2]
    entries.write("abc", lambda staging: np.save(staging / "embed.npy", np.zeros((3, 2), np.float32)), {"n": 2})
    assert entries.meta("abc")["n"] == 1  # another job finished the same entry first: kept
    np.testing.assert_array_equal(entries.load("abc", "embed"), np.ones((2, 2)))


def test_cache_never_writes_outside_its_folder(tmp_path):
    entries = store.EmbeddingCache(tmp_path / "cache")
    for key in ("../outside", "/etc/passwd", "a/b", "..", ""):
        with pytest.raises(ValueError, match="cache key must be alphanumeric"):
            entries.write(key, lambda staging: np.save(staging / "embed.npy", np.zeros((2, 2), np.float32)), {})
    assert not (tmp_path / "outside").exists() and not any((tmp_path / "cache").glob("*/"))
