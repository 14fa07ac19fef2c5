"""Raw pixels as the embedding: the baseline every model must beat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from latentmap import settings
from latentmap.models.base import Backbone, LayerInfo


@dataclass
class PixelsBackbone(Backbone):
    """Raw pixels as the embedding: each image resized to ``size`` x ``size`` RGB, in [0, 1], flattened."""

    # 1: bilinear resize to size x size, RGB in [0, 1], flattened row-major (H, W, 3).
    FEATURE_VERSION: ClassVar[int] = 1
    TRAINABLE: ClassVar[bool] = False  # no weights
    BLOCKS: ClassVar[bool] = False  # nothing but the pixels themselves

    name: str = "pixels"
    size: int = 32

    def identity(self) -> dict[str, Any]:
        return {"kind": "pixels", "size": self.size}

    def load(self, device: str = "auto", precision: str = "fp32") -> LayerInfo:
        """No model to load: pixels are computed on the CPU, in float32, whatever is asked."""
        settings.require("model.size", self.size)
        self._device = "cpu"
        self._info = self._load()
        return self._info

    def _load(self) -> LayerInfo:
        return LayerInfo(num_layers=0, block_pools=())

    def preprocess(self, images: list) -> np.ndarray:
        """(B, size, size, 3) float32 in [0, 1]: numpy, not torch, since nothing here needs torch,
        and a numpy batch leaves a DataLoader worker as bytes rather than through a shared-memory
        tensor's file (with the batch decoder, extraction of 32x32 PNGs ran 1.12x faster;
        docs/performance.md)."""
        from PIL import Image

        pixels = np.stack([np.asarray(image.resize((self.size, self.size), Image.Resampling.BILINEAR))
                           for image in images])  # (B, H, W, 3) uint8
        return pixels.astype(np.float32) / np.float32(255.0)

    def _model_input(self, batch: Any) -> Any:
        """The batch as a torch tensor (what ``Backbone.embed_with_grad`` hands ``_forward``)."""
        import torch

        return torch.from_numpy(np.asarray(batch))

    def _forward(self, pixel_values: Any) -> dict[str, Any]:
        return {"embed": pixel_values.reshape(len(pixel_values), -1)}  # (B, H * W * 3)

    def start_features(self, batch: Any) -> Callable[[], dict[str, np.ndarray]]:
        values = {name: np.asarray(array, dtype=np.float32) for name, array in self._forward(batch).items()}
        return lambda: values
