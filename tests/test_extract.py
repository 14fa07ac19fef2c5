"""Batched extraction: every feature of every block in one pass, whatever the batch size, streamed
to disk or collected in memory, with unreadable images skipped or refused."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import data
from latentmap.errors import ConfigError
from latentmap.extract import extract
from latentmap.models import PixelsBackbone, TransformersBackbone

from helpers import extraction, write_class_images


@pytest.fixture(scope="module")
def vit(tiny_vit):
    backbone = TransformersBackbone(name=str(tiny_vit))
    backbone.load("cpu")
    return backbone


def test_batches_streamed_to_disk_equal_one_whole_batch(vit, class_folder, tmp_path):
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    images = [data.decode_rgb(record, i, data.PIL_MAX_IMAGE_PIXELS)
              for i, record in enumerate(data.undecoded(dataset)["image"])]
    whole = vit.start_features(vit.prepare(images))()  # one batch of all 32 images
    streamed = extract(vit, dataset, extraction(batch_size=5), out_dir=tmp_path, progress=False)
    in_memory = extract(vit, dataset, extraction(batch_size=32), progress=False)
    assert set(streamed) == set(whole) == set(in_memory)
    assert {"embed", "layer000.cls", "layer000.mean", "layer002.cls", "layer002.mean"} <= set(whole)
    for name, values in whole.items():
        assert streamed[name].shape == (32, values.shape[1]) and streamed[name].dtype == np.float32
        np.testing.assert_allclose(streamed[name], values, atol=1e-5)
        np.testing.assert_allclose(in_memory[name], values, atol=1e-5)
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), streamed[name])


def test_the_model_runs_inside_reuse_freed_memory_on_the_cpu_unless_the_setting_is_off(vit, class_folder,
                                                                                        monkeypatch):
    """Every forward pass of a CPU extraction runs inside machine.reuse_freed_memory (asked to act),
    and with ``reuse_freed_memory=false`` inside one asked not to."""
    import contextlib

    from latentmap import machine

    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    state = {"open": None}
    seen = []
    own = machine.reuse_freed_memory

    @contextlib.contextmanager
    def watched(enabled=True):
        with own(enabled) as changed:
            state["open"] = enabled
            yield changed
        state["open"] = None

    forward = vit._forward
    monkeypatch.setattr(machine, "reuse_freed_memory", watched)
    monkeypatch.setattr(vit, "_forward", lambda *args, **kwargs: seen.append(state["open"]) or forward(*args, **kwargs))
    extract(vit, dataset, extraction(batch_size=8), progress=False)
    assert seen == [True] * 4 and state["open"] is None
    seen.clear()
    extract(vit, dataset, extraction(batch_size=8, reuse_freed_memory=False), progress=False)
    assert seen == [False] * 4


def test_reused_memory_gives_the_same_features_bit_for_bit(class_folder, monkeypatch):
    """With freed memory reused, a batch's activations land in memory the previous batch wrote (not
    fresh zeroed pages): a kernel that read memory it had not written would show here. ResNet-18 at
    224 px, batches of 16: its first activations are 51 MB, above glibc's largest own threshold."""
    import contextlib

    import torch

    from latentmap import machine
    from latentmap.models.timm_models import TimmBackbone

    torch.manual_seed(0)
    backbone = TimmBackbone(name="resnet18", pretrained=False)
    backbone.load("cpu")
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    opened = []
    own = machine.reuse_freed_memory

    @contextlib.contextmanager
    def counted(enabled=True):
        with own(enabled) as changed:
            opened.append(changed)
            yield changed

    monkeypatch.setattr(machine, "reuse_freed_memory", counted)
    plain = extract(backbone, dataset, extraction(batch_size=16, reuse_freed_memory=False), progress=False)
    reused = extract(backbone, dataset, extraction(batch_size=16), progress=False)
    assert opened[0] is False
    if machine._glibc() is not None and not machine._user_set_allocator():
        assert opened[1] is True  # the thresholds took: this comparison is the one that matters
    assert set(reused) == set(plain)
    for name in plain:
        np.testing.assert_array_equal(reused[name], plain[name])


def test_unreadable_images_are_skipped_with_their_rows_or_refused(tmp_path):
    folder = tmp_path / "images"
    write_class_images(folder, n_per_class=3)
    bad = folder / "green" / "001.png"
    bad.write_text("not an image")
    dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
    backbone = PixelsBackbone(size=4)
    backbone.load()
    skipped: list[int] = []
    features = extract(backbone, dataset,
                       extraction(batch_size=4, on_error="skip"), out_dir=tmp_path, skipped=skipped, progress=False)
    assert skipped == [4]  # blue 0..2, then green/000, green/001
    good = [data.decode_rgb(r, i, data.PIL_MAX_IMAGE_PIXELS)
            for i, r in enumerate(data.undecoded(dataset)["image"]) if i != 4]
    np.testing.assert_array_equal(features["embed"], backbone.start_features(backbone.prepare(good))()["embed"])
    with pytest.raises(ConfigError, match=f"unreadable image {bad}.*dataset.on_error=skip"):
        extract(backbone, dataset, extraction(batch_size=4, on_error="raise"), progress=False)


def test_a_batch_of_rows_is_the_rows_one_by_one(class_folder, tmp_path):
    """Rows.__getitems__ (the DataLoader's one query a batch) gives what Rows[i] gives row by row,
    for a labelled folder and an unlabelled one, rows in any order."""
    from PIL import Image

    from latentmap.extract import Rows

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(flat / f"{i}.png")
    for folder in (class_folder, flat):
        rows = Rows(data.ImageFolderSource(path=str(folder)).load(seed=0))
        order = [3, 0, 4, 1, 1]
        batch = rows.__getitems__(order)
        assert batch == [rows[i] for i in order] and len({b[1] for b in batch}) == 4
    assert {label for _, _, label in batch} == {-1} and not rows.labelled


def test_automatic_workers_decode_large_sets_beside_the_model_with_the_same_features(tmp_path, monkeypatch):
    """num_workers=null (the default): no worker process below extract.AUTO_WORKERS_FROM images, one a
    usable CPU core (at most 4) from there on where processes start by fork, none where they do not;
    a number is taken as given. The workers' features equal the main process's, row for row."""
    import multiprocessing

    import torch.utils.data

    from latentmap import settings
    from latentmap.extract import AUTO_WORKERS_FROM, loader_workers
    from latentmap.machine import usable_cores

    forked = (multiprocessing.get_start_method(allow_none=True)
              or multiprocessing.get_all_start_methods()[0]) == "fork"  # Linux before Python 3.14
    expected = min(4, usable_cores()) if forked else 0
    assert extraction().num_workers is None  # the default config's
    assert loader_workers(None, AUTO_WORKERS_FROM - 1) == 0
    assert loader_workers(None, AUTO_WORKERS_FROM) == loader_workers(None, 10**6) == expected
    assert loader_workers(0, 10**6) == 0 and loader_workers(3, 10) == 3
    assert f"{AUTO_WORKERS_FROM:,} images" in settings.RUN["num_workers"].null  # the reference says so
    with monkeypatch.context() as patched:  # spawned workers would get a pickled copy of the model
        patched.setattr("multiprocessing.get_start_method", lambda *args, **kwargs: "spawn")
        assert loader_workers(None, 10**6) == 0 and loader_workers(2, 10**6) == 2
    asked = []

    class Spy(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            asked.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", Spy)
    write_class_images(tmp_path / "images", n_per_class=AUTO_WORKERS_FROM // 4)
    dataset = data.ImageFolderSource(path=str(tmp_path / "images")).load(seed=0)
    backbone = PixelsBackbone(size=8)
    backbone.load("cpu", "fp32")
    automatic = extract(backbone, dataset, extraction(batch_size=50), progress=False)["embed"]
    serial = extract(backbone, dataset, extraction(batch_size=50, num_workers=0), progress=False)["embed"]
    assert asked == [expected, 0] and len(serial) == AUTO_WORKERS_FROM
    assert np.array_equal(automatic, serial)


def test_pixels_features_are_the_former_torch_form_with_and_without_workers(tmp_path):
    """model=pixels computes in numpy (its batches leave the DataLoader's workers as bytes): the
    features, extracted in the main process and in 2 workers, equal bit for bit the form it had
    before (each image resized by PIL, as float32 in a torch tensor, divided by 255), on PNGs of
    several sizes and modes and a JPEG."""
    import torch
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images" / "mixed"
    folder.mkdir(parents=True)
    for i, (size, mode) in enumerate([((32, 32), "RGB"), ((40, 24), "L"), ((17, 33), "P"), ((64, 64), "RGBA")] * 6):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(
            folder / f"{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(folder / "999.jpg")
    dataset = data.ImageFolderSource(path=str(tmp_path / "images")).load(seed=0)
    images = [data.decode_rgb(r, i, None) for i, r in enumerate(data.undecoded(dataset)["image"])]
    for size in (16, 7):
        former = torch.from_numpy(np.stack([
            np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), np.float32) for image in images
        ]) / np.float32(255.0)).reshape(len(images), -1).numpy()
        backbone = PixelsBackbone(size=size)
        backbone.load()
        for workers in (0, 2):
            found = extract(backbone, dataset, extraction(batch_size=4, num_workers=workers), progress=False)
            assert found["embed"].dtype == np.float32
            np.testing.assert_array_equal(found["embed"], former)
