"""The embedding cache: a key that survives edits to the code and changes with what features mean,
precision in the key, a damaged array extracted again (the store: test_store.py; shards: test_shards.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from latentmap import cache, data, store
from latentmap.models import PixelsBackbone

from helpers import ROOT, extraction


@pytest.fixture
def images(class_folder):
    return data.ImageFolderSource(path=str(class_folder)).load(seed=0)


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
    probe = ("import sys; from latentmap import data, store; from latentmap.models import PixelsBackbone; "
             "b = PixelsBackbone(size=8); d = data.ImageFolderSource(path=sys.argv[1]).load(seed=0); "
             "print(store.make_key(b.identity(), data.fingerprint(d), store.feature_format(b))[0])")
    result = subprocess.run([sys.executable, "-c", probe, str(class_folder)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(copy)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    backbone = PixelsBackbone(size=8)
    key = store.make_key(backbone.identity(), data.fingerprint(images), store.feature_format(backbone))[0]
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

