"""Batched extraction: images in, every feature of every block out, one forward pass per batch.

Decoding and preprocessing run in a ``torch.utils.data.DataLoader`` (``num_workers`` worker
processes when > 0) while the model runs under ``torch.inference_mode`` on its device.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np

from latentmap import data
from latentmap.models import Backbone

log = logging.getLogger(__name__)


class _Rows:
    """Map-style view of an undecoded dataset: item ``i`` is (record, row number)."""

    def __init__(self, raw_dataset):
        self.raw = raw_dataset

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, row: int):
        record = self.raw[row]
        return record["image"], int(record["index"])


def _collate(batch, backbone: Backbone):
    images = [data.decode_rgb(record, index) for record, index in batch]
    return backbone.preprocess(images)


def extract(
    backbone: Backbone,
    dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run ``backbone`` (already loaded) over every image of ``dataset``.

    Returns:
        feature name -> (N, D) float32 array, for ``embed`` and every block and pooling.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    loader = DataLoader(
        _Rows(data.undecoded(dataset)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(_collate, backbone=backbone),
        pin_memory=backbone.device.startswith("cuda"),
    )
    chunks: dict[str, list[np.ndarray]] = {}
    with tqdm(total=len(dataset), desc="extract", unit="img", disable=not progress) as bar:
        for pixel_values in loader:
            for name, values in backbone.features(pixel_values).items():
                chunks.setdefault(name, []).append(values)
            bar.update(len(pixel_values))
    return {name: np.concatenate(parts) for name, parts in chunks.items()}
