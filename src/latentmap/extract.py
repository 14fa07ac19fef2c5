"""Batched extraction: images in, every feature of every block out, one forward pass per batch.

Decoding and preprocessing run in a ``torch.utils.data.DataLoader`` (``num_workers`` worker
processes when > 0; by default :func:`loader_workers` picks them) while the model runs under
``torch.inference_mode`` on its device. On CUDA the workers send uint8 pixels and preprocessing
finishes on the GPU (a transformers image processor resizes and normalises there; a timm
transform normalises there). Each batch is queued before the
previous batch's features are collected, so the GPU works while the CPU writes. With ``out_dir``,
every batch is written straight into one memory-mapped ``.npy`` file per feature, so memory holds
one batch of images and features at a time whatever the dataset's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from latentmap import data, faults, machine, settings
from latentmap.errors import ConfigError, UnreadableImage
from latentmap.machine import forks_by_default, usable_cores
from latentmap.models import Backbone
from latentmap.models.base import batch_length

log = logging.getLogger(__name__)

# The version of the cache entry's layout and of how extraction turns images into features (RGB
# decoding, batching, float32 arrays): part of every cache key. Bump it on purpose, with a note here,
# when a change makes features or entries differ. 1: the layout of latentmap 0.1. 2: 16-bit and
# other wide greyscale images scaled to 8 bits, no longer clipped at 255 (data.as_rgb); every other
# image decodes as before, so an entry is extracted again once. 3: images turned upright as their
# EXIF orientation says (data.upright: phone photos were read sideways); only images with the tag
# change, but every entry is extracted again once, as at 2. 4: wide greyscale images read by one range
# for every image of a mode (dataset.intensity_range; a 32-bit integer image whose values stayed under
# 256 was kept as it was, a float image above 1 was clipped, not scaled), and a PNG's EXIF block after
# its pixels read (it was read sideways); other images decode as before.
FORMAT_VERSION = 4


# num_workers: null (automatic) decodes in worker processes from this many images on. Below it a
# worker's start costs about what it saves; above it decoding runs beside the model (20,000 32x32
# PNGs through model=pixels: 1.6x faster with 2 workers on 2 cores; EfficientNet-Lite0 on the CPU:
# about the same time either way; scripts/bench.py --only workers, docs/performance.md).
AUTO_WORKERS_FROM = 1000


def loader_workers(num_workers: int | None, n_images: int) -> int:
    """The DataLoader's worker processes for ``num_workers`` (the setting) over ``n_images``: the
    setting itself, or for null (automatic) none below :data:`AUTO_WORKERS_FROM` images and else
    one per CPU core this process may use, at most 4. Automatic workers only where processes start
    by fork (Linux before Python 3.14): a worker started by spawn (macOS, Windows) or forkserver (Linux
    from Python 3.14) would receive a pickled copy of the model."""
    if num_workers is not None:
        return int(num_workers)
    if n_images < AUTO_WORKERS_FROM or not forks_by_default():
        return 0
    cores = usable_cores()
    return min(4, cores)


@dataclass(frozen=True)
class Extraction:
    """How images become features, as one value: the settings every extraction takes from a config
    (``batch_size``, ``num_workers``, ``device``, ``precision``, ``dataset.on_error``,
    ``dataset.max_image_pixels``, ``reuse_freed_memory`` and ``dataset.intensity_range``), each
    checked against its rule
    (:mod:`latentmap.settings`)."""

    batch_size: int
    num_workers: int | None  # None: automatic (loader_workers)
    device: str
    precision: str
    on_error: str  # skip: an unreadable image is dropped with a warning; raise: it stops extraction
    max_image_pixels: int | None  # PIL's decompression-bomb limit (None: no limit)
    reuse_freed_memory: bool = True  # on the CPU, the model's freed memory kept for the next batch (machine.py)
    intensity_range: tuple[float, float] | None = None  # a 16- or 32-bit image's black and white (None: by mode)

    def __post_init__(self) -> None:
        for key, value in (("batch_size", self.batch_size), ("num_workers", self.num_workers),
                           ("device", self.device), ("precision", self.precision),
                           ("dataset.on_error", self.on_error), ("dataset.max_image_pixels", self.max_image_pixels),
                           ("reuse_freed_memory", self.reuse_freed_memory),
                           ("dataset.intensity_range", self.intensity_range)):
            settings.require(key, value)

    @classmethod
    def of(cls, cfg) -> Extraction:
        """The extraction settings of a composed config."""
        return cls(cfg.batch_size, cfg.num_workers, cfg.device, cfg.precision, cfg.dataset.on_error,
                   cfg.dataset.max_image_pixels, cfg.reuse_freed_memory, data.intensity_of(cfg.dataset))


class Rows:
    """Map-style view of a dataset without decoding: item ``i`` is (image record, index, label);
    the label is -1 for an unlabelled dataset."""

    def __init__(self, dataset):
        self.raw = data.undecoded(dataset)
        self.labelled = "label" in dataset.column_names

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, row: int):
        record = self.raw[row]
        return record["image"], int(record["index"]), int(record["label"]) if self.labelled else -1

    def __getitems__(self, rows: list[int]) -> list[tuple]:
        """A batch's items from one query of the table (what torch's DataLoader asks for when this
        exists): about a fifth of the time of one query a row."""
        batch = self.raw[list(rows)]
        labels = batch["label"] if self.labelled else [-1] * len(rows)
        return [(record, int(index), int(label))
                for record, index, label in zip(batch["image"], batch["index"], labels)]


def collate(batch, backbone: Backbone, max_pixels: int | None, with_labels: bool = False,
            intensity: tuple[float, float] | None = None, drop_unreadable: bool = False):
    """Decode and preprocess a batch of rows: pixel values, and (B,) labels when asked.
    ``drop_unreadable`` (fine-tuning with dataset.on_error=skip): an image that cannot be read leaves
    the batch, with a warning naming it; a batch left empty is None."""
    import torch

    with data.rgb_decoder(max_pixels, intensity) as decode:
        if drop_unreadable:
            kept, images = [], []
            for row in batch:
                try:
                    images.append(decode(row[0], row[1]))
                    kept.append(row)
                except ConfigError as error:
                    what = error.what if isinstance(error, UnreadableImage) else str(error)
                    log.warning("skipping %s", f"unreadable image {what}" if isinstance(error, UnreadableImage)
                                else what)
            batch = kept
            if not batch:
                return None
        else:
            images = [decode(record, index) for record, index, _ in batch]
    pixel_values = backbone.prepare(images)
    if with_labels:
        return pixel_values, torch.tensor([label for _, _, label in batch])
    return pixel_values


def collate_skipping(batch, backbone: Backbone, max_pixels: int | None,
                     intensity: tuple[float, float] | None = None):
    """Like :func:`collate`, but an unreadable image becomes a blank placeholder, reported with a
    warning naming the file: (pixel values, [(position in the batch, why) of each that failed])."""
    images, failed = [], []
    with data.rgb_decoder(max_pixels, intensity) as decode:
        for position, (record, index, _) in enumerate(batch):
            try:
                images.append(decode(record, index))
            except ConfigError as error:
                what = error.what if isinstance(error, UnreadableImage) else str(error)
                log.warning("skipping %s", f"unreadable image {what}" if isinstance(error, UnreadableImage) else what)
                images.append(_placeholder())
                failed.append((position, what))
    return backbone.prepare(images), failed


def _placeholder():
    from PIL import Image

    return Image.new("RGB", (32, 32))


def extract(
    backbone: Backbone,
    dataset,
    how: Extraction,
    progress: bool = True,
    out_dir: Path | None = None,
    skipped: list[int] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``backbone`` (already loaded) over every image of ``dataset``.

    Args:
        out_dir: when given, write each feature to ``<out_dir>/<feature>.npy`` batch by batch
            (memory-mapped) instead of collecting the batches in memory.
        how: batch size and workers; ``on_error``: ``raise`` (an unreadable image stops extraction
            with a ConfigError naming it) or ``skip`` (it is dropped from every array, with a warning
            naming it); ``max_image_pixels`` (see :func:`latentmap.data.decode_rgb`).
        skipped: when given, receives the rows that were skipped.

    Raises:
        ConfigError: when no image at all could be read (whatever ``on_error``), naming the first few.

    Returns:
        feature name -> (N, D) float32 array (a ``np.memmap`` with ``out_dir``), for ``embed``
        and every block and pooling.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    on_error = how.on_error
    loader = DataLoader(
        Rows(dataset),
        batch_size=how.batch_size,
        shuffle=False,
        num_workers=loader_workers(how.num_workers, len(dataset)),
        collate_fn=partial(collate_skipping if on_error == "skip" else collate, backbone=backbone,
                           max_pixels=how.max_image_pixels, intensity=how.intensity_range),
        pin_memory=backbone.device.startswith("cuda"),
    )
    n = len(dataset)
    chunks: dict[str, list[np.ndarray]] = {}
    files: dict[str, np.memmap] = {}
    done = 0
    failed_rows: list[int] = []
    reasons: list[str] = []  # why the first few failed, for the no-readable-images message

    def write(wait, count: int) -> None:
        nonlocal done
        for name, values in wait().items():
            if out_dir is None:
                chunks.setdefault(name, []).append(values)
                continue
            if name not in files:
                files[name] = np.lib.format.open_memmap(
                    Path(out_dir) / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, values.shape[1]))
            files[name][done : done + count] = values
        done += count
        bar.update(count)
        faults.point("extract")

    # On the CPU the model's activations reuse freed memory instead of faulting in fresh pages
    # (machine.py); DataLoader workers, forked inside, keep the same thresholds until they exit.
    keep = how.reuse_freed_memory and backbone.device == "cpu"
    with machine.reuse_freed_memory(keep), tqdm(total=n, desc="extract", unit="img", disable=not progress) as bar:
        queued, pending = 0, None
        for item in loader:
            pixel_values, failed = item if on_error == "skip" else (item, [])
            failed_rows.extend(queued + position for position, _ in failed)
            reasons.extend(why for _, why in failed[: 3 - len(reasons)])
            # Queue this batch before collecting the previous one: the device works on batch i
            # while the CPU writes batch i - 1.
            started = backbone.start_features(pixel_values), batch_length(pixel_values)
            queued += started[1]
            if pending is not None:
                write(*pending)
            pending = started
        if pending is not None:
            write(*pending)
    if n and len(failed_rows) == n:
        raise ConfigError(data.no_readable_images(n, reasons))
    if skipped is not None:
        skipped.extend(failed_rows)
    if out_dir is None:
        return {name: np.delete(np.concatenate(parts), failed_rows, axis=0) for name, parts in chunks.items()}
    for array in files.values():
        array.flush()
    if failed_rows:  # rewrite each file without the skipped rows
        for name in list(files):
            kept = np.delete(files.pop(name), failed_rows, axis=0)
            np.save(Path(out_dir) / f"{name}.npy", kept, allow_pickle=False)
            files[name] = np.load(Path(out_dir) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
    return files
