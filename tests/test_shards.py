"""Sharded extraction: slices extracted by separate jobs assemble into what one process extracts, and
a bad dataset.shard is one line."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from latentmap import cache, data, shards
from latentmap.errors import ConfigError
from latentmap.models import PixelsBackbone

from helpers import cache_entries, extraction


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

    shard = shards.extract_shard(backbone, images, (1, 3), -1, "embed", tmp_path / "sharded",
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
    again = shards.extract_shard(backbone, images, (0, 3), -1, "embed", tmp_path / "sharded", extraction())
    assert again.complete and again.present == 3  # nothing left to extract


@pytest.mark.parametrize("value,message", [
    ("2/2", r"dataset.shard='2/2' must be i/n with 0 <= i < n.*dataset.shard=0/4"),
    ("first", r"dataset.shard='first' must be i/n"),
    ("0/40", r"dataset.shard=0/40 splits 32 images into 40 slices: use at most 32 shards"),
])
def test_a_bad_shard_is_refused_in_one_line(value, message):

    with pytest.raises(ConfigError, match=message):
        shards.parse_shard(value, 32)
    assert shards.parse_shard("3/4", 32) == (3, 4) and shards.parse_shard(None) is None
