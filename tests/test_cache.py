"""The embedding cache: what its key is made of (and not), atomic entries, checksums, its folder."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from latentmap import cache, data
from latentmap.models import PixelsBackbone

from helpers import ROOT, cache_entries, extraction


@pytest.fixture
def images(class_folder):
    return data.ImageFolderSource(path=str(class_folder)).load(seed=0)


def test_the_key_is_the_hash_of_model_dataset_and_format_versions_only(images):
    backbone = PixelsBackbone(size=8)
    formats = cache.feature_format(backbone)
    assert formats == {"backbone": PixelsBackbone.FEATURE_VERSION, "extract": 1}
    key, description = cache.make_key(backbone.identity(), data.fingerprint(images), formats)
    expected = {"model": {"kind": "pixels", "size": 8}, "dataset": data.fingerprint(images), "format": formats}
    assert description == expected
    assert key == hashlib.sha256(json.dumps(expected, sort_keys=True).encode()).hexdigest()[:32]


def test_editing_the_code_keeps_entries_valid_and_a_bumped_version_misses(images, class_folder, tmp_path,
                                                                         monkeypatch):
    """A comment in models/extract/data and a new dataset class (in a copy of the package, read by a
    fresh interpreter) give the same key; bumping a backbone's FEATURE_VERSION gives another."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "latentmap", copy / "latentmap")
    shutil.copytree(ROOT / "conf", tmp_path / "conf")  # the defaults the package reads, beside it as in the repository
    for name in ("models/base.py", "extract.py", "data.py"):
        with (copy / "latentmap" / name).open("a") as handle:
            handle.write("\n# a comment that changes nothing\n")
    with (copy / "latentmap" / "data.py").open("a") as handle:
        handle.write("\n\nclass NewSource(Source):\n    def read(self):\n        return None\n")
    probe = ("import sys; from latentmap import cache, data; from latentmap.models import PixelsBackbone; "
             "b = PixelsBackbone(size=8); d = data.ImageFolderSource(path=sys.argv[1]).load(seed=0); "
             "print(cache.make_key(b.identity(), data.fingerprint(d), cache.feature_format(b))[0])")
    result = subprocess.run([sys.executable, "-c", probe, str(class_folder)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(copy)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    backbone = PixelsBackbone(size=8)
    key = cache.make_key(backbone.identity(), data.fingerprint(images), cache.feature_format(backbone))[0]
    assert result.stdout.strip() == key

    first = cache.embeddings(backbone, images, -1, "embed", tmp_path / "cache", extraction())
    assert first.status == "miss" and first.key == key
    assert cache.embeddings(backbone, images, -1, "embed", tmp_path / "cache", extraction()).status == "hit"
    monkeypatch.setattr(PixelsBackbone, "FEATURE_VERSION", PixelsBackbone.FEATURE_VERSION + 1)
    bumped = cache.embeddings(backbone, images, -1, "embed", tmp_path / "cache", extraction())
    assert bumped.status == "miss" and bumped.key != key
    np.testing.assert_array_equal(bumped.values, first.values)


def test_precision_is_part_of_the_key(images, tmp_path):
    backbone = PixelsBackbone(size=8)
    fp32 = cache.embeddings(backbone, images, -1, "embed", tmp_path, extraction(precision="fp32"))
    bf16 = cache.embeddings(backbone, images, -1, "embed", tmp_path, extraction(precision="bf16"))
    assert fp32.key != bf16.key and bf16.status == "miss"


def test_a_damaged_array_is_never_used_and_is_extracted_again(images, tmp_path, caplog):
    backbone = PixelsBackbone(size=8)
    first = cache.embeddings(backbone, images, -1, "embed", tmp_path, extraction())
    reference = np.array(first.values)
    path = tmp_path / first.key / "embed.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(raw))
    again = cache.embeddings(backbone, images, -1, "embed", tmp_path, extraction())
    assert again.status == "miss" and "damaged (checksum)" in caplog.text
    np.testing.assert_array_equal(again.values, reference)
    path.write_bytes(path.read_bytes()[:-8])
    assert cache.embeddings(backbone, images, -1, "embed", tmp_path, extraction()).status == "miss"
    assert "damaged (size)" in caplog.text


def test_a_failed_write_leaves_nothing_and_a_complete_entry_is_kept(tmp_path):
    store = cache.EmbeddingCache(tmp_path)

    def broken(staging):
        np.save(staging / "embed.npy", np.zeros((2, 2), np.float32))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write("abc", broken, {})
    assert cache_entries(tmp_path) == [] and store.meta("abc") is None
    store.write("abc", lambda staging: np.save(staging / "embed.npy", np.ones((2, 2), np.float32)), {"n": 1})
    meta = store.meta("abc")
    assert meta["n"] == 1 and meta["arrays"]["embed"]["shape"] == [2, 2]
    store.write("abc", lambda staging: np.save(staging / "embed.npy", np.zeros((3, 2), np.float32)), {"n": 2})
    assert store.meta("abc")["n"] == 1  # another job finished the same entry first: kept
    np.testing.assert_array_equal(store.load("abc", "embed"), np.ones((2, 2)))


def test_cache_never_writes_outside_its_folder(tmp_path):
    store = cache.EmbeddingCache(tmp_path / "cache")
    for key in ("../outside", "/etc/passwd", "a/b", "..", ""):
        with pytest.raises(ValueError, match="cache key must be alphanumeric"):
            store.write(key, lambda staging: np.save(staging / "embed.npy", np.zeros((2, 2), np.float32)), {})
    assert not (tmp_path / "outside").exists() and not any((tmp_path / "cache").glob("*/"))


def test_shards_with_an_unreadable_image_assemble_what_one_process_extracts(class_folder, tmp_path):
    """3 shards, one extracted by a shard job and two left to the later unsharded run, with an
    unreadable image in the last: the assembled entry's meta.json (skipped rows included) and arrays
    equal a one-process extraction's, and the shards are removed."""
    folder = tmp_path / "images"
    shutil.copytree(class_folder, folder)
    (folder / "yellow" / "zz_broken.png").write_bytes(b"not an image")
    images = data.ImageFolderSource(path=str(folder)).load(seed=0)
    backbone = PixelsBackbone(size=8)
    single = cache.embeddings(backbone, images, -1, "embed", tmp_path / "one",
                              extraction(batch_size=7, on_error="skip"))
    assert len(single.skipped) == 1

    shard = cache.extract_shard(backbone, images, (1, 3), -1, "embed", tmp_path / "sharded",
                                extraction(batch_size=4, on_error="skip"))
    assert (shard.key, shard.rows, shard.present, shard.complete) == (single.key, (11, 22), 1, False)
    assert [p.name for p in cache_entries(tmp_path / "sharded")] == [f"{single.key}-shards"]
    killed = tmp_path / "sharded" / f"{single.key}-shards" / ".tmp-2of3-x1y2"  # a writer killed before publishing
    killed.mkdir()
    (killed / "meta.json").write_text("{}")
    assembled = cache.embeddings(backbone, images, -1, "embed", tmp_path / "sharded",
                                 extraction(batch_size=5, on_error="skip"))
    assert assembled.status == "assembled" and assembled.skipped == single.skipped
    entry, reference = tmp_path / "sharded" / single.key, tmp_path / "one" / single.key
    assert (entry / "meta.json").read_text() == (reference / "meta.json").read_text()
    np.testing.assert_array_equal(assembled.values, single.values)
    assert [p.name for p in cache_entries(tmp_path / "sharded")] == [single.key]  # the shards are gone
    again = cache.extract_shard(backbone, images, (0, 3), -1, "embed", tmp_path / "sharded", extraction())
    assert again.complete and again.present == 3  # nothing left to extract


@pytest.mark.parametrize("value,message", [
    ("2/2", r"dataset.shard='2/2' must be i/n with 0 <= i < n.*dataset.shard=0/4"),
    ("first", r"dataset.shard='first' must be i/n"),
    ("0/40", r"dataset.shard=0/40 splits 32 images into 40 slices: use at most 32 shards"),
])
def test_a_bad_shard_is_refused_in_one_line(value, message):
    from latentmap.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        cache.parse_shard(value, 32)
    assert cache.parse_shard("3/4", 32) == (3, 4) and cache.parse_shard(None) is None
