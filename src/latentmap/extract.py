"""Batched extraction: images in, every feature of every block out, one forward pass per batch.

Decoding and preprocessing run in a ``torch.utils.data.DataLoader`` (``num_workers`` worker
processes when > 0) while the model runs under ``torch.inference_mode`` on its device. With
``out_dir``, every batch is written straight into one memory-mapped ``.npy`` file per feature, so
memory holds one batch of images and features at a time whatever the dataset's size.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np

from latentmap import data
from latentmap.models import Backbone

log = logging.getLogger(__name__)


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


def collate(batch, backbone: Backbone, with_labels: bool = False):
    """Decode and preprocess a batch of rows: pixel values, and (B,) labels when asked."""
    import torch

    pixel_values = backbone.preprocess([data.decode_rgb(record, index) for record, index, _ in batch])
    if with_labels:
        return pixel_values, torch.tensor([label for _, _, label in batch])
    return pixel_values


def extract(
    backbone: Backbone,
    dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    out_dir: Path | None = None,
) -> dict[str, np.ndarray]:
    """Run ``backbone`` (already loaded) over every image of ``dataset``.

    Args:
        out_dir: when given, write each feature to ``<out_dir>/<feature>.npy`` batch by batch
            (memory-mapped) instead of collecting the batches in memory.

    Returns:
        feature name -> (N, D) float32 array (a ``np.memmap`` with ``out_dir``), for ``embed``
        and every block and pooling.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(
        Rows(dataset),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(collate, backbone=backbone),
        pin_memory=backbone.device.startswith("cuda"),
    )
    n = len(dataset)
    chunks: dict[str, list[np.ndarray]] = {}
    files: dict[str, np.memmap] = {}
    done = 0
    with tqdm(total=n, desc="extract", unit="img", disable=not progress) as bar:
        for pixel_values in loader:
            batch = backbone.features(pixel_values)
            for name, values in batch.items():
                if out_dir is None:
                    chunks.setdefault(name, []).append(values)
                    continue
                if name not in files:
                    files[name] = np.lib.format.open_memmap(
                        Path(out_dir) / f"{name}.npy", mode="w+", dtype=np.float32, shape=(n, values.shape[1]))
                files[name][done : done + len(values)] = values
            done += len(pixel_values)
            bar.update(len(pixel_values))
    if out_dir is None:
        return {name: np.concatenate(parts) for name, parts in chunks.items()}
    for array in files.values():
        array.flush()
    return files
