"""transformers backbones: ``AutoModel`` + ``AutoImageProcessor``, with per-family behaviour in
one table (:data:`FAMILIES`, keyed by ``config.model_type``) instead of branches.

A :class:`Family` says how to build a family's model from its checkpoint, where its blocks start
in ``hidden_states`` and what its ``embed`` is. Families not in the table get :class:`Family`'s
defaults: ``AutoModel``; block ``i`` is ``hidden_states[i + 1]``; ``embed`` is the final-norm
[CLS] token of a token model with a class token, the mean of the final tokens of one without,
and the global average of a CNN's last feature map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from latentmap.errors import ConfigError
from latentmap.models.base import (Backbone, LayerInfo, blank_image, device_preprocessing, dir_fingerprint,
                                   load_error, pool_blocks)

log = logging.getLogger(__name__)

# Image processor base classes that take tensors and a `device` (transformers 5; 4.x's fast ones).
_DEVICE_PROCESSORS = frozenset({"TorchvisionBackend", "BaseImageProcessorFast"})


class Family:
    """How latentmap reads one family of transformers image models (the defaults)."""

    # hidden_states[hidden_offset + i] is block i (hidden_states[0] is the embedding output).
    hidden_offset: int = 1

    def build(self, name: str, config: Any, options: dict[str, Any]) -> Any:
        """The model of checkpoint ``name`` (its loaded ``config``), ready for ``output_hidden_states``."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(name, **options)

    def embed(self, outputs: Any, num_prefix_tokens: int) -> Any:
        """(B, D) ``embed`` feature from the model's outputs."""
        final = outputs.last_hidden_state
        if final.ndim == 4:  # CNN: (B, C, H, W)
            return final.mean(dim=(2, 3))
        if num_prefix_tokens > 0:  # the final-norm class token
            return final[:, 0]
        return final.mean(dim=1)


class BlockOutputsOnly(Family):
    """MobileNet V1/V2: ``hidden_states`` hold block outputs only (no embedding output)."""

    hidden_offset = 0


class ClipVisionTower(Family):
    """CLIP (whole model or vision tower): the vision tower with its projection
    (``CLIPVisionModelWithProjection``), so ``embed`` is CLIP's image embedding."""

    def build(self, name: str, config: Any, options: dict[str, Any]) -> Any:
        from transformers import CLIPVisionModelWithProjection

        vision_config = getattr(config, "vision_config", config)
        vision_config.projection_dim = config.projection_dim  # top-level in CLIPConfig
        return CLIPVisionModelWithProjection.from_pretrained(name, config=vision_config, **options)

    def embed(self, outputs: Any, num_prefix_tokens: int) -> Any:
        return outputs.image_embeds


FAMILIES: dict[str, Family] = {
    "clip": ClipVisionTower(),
    "clip_vision_model": ClipVisionTower(),
    "mobilenet_v1": BlockOutputsOnly(),
    "mobilenet_v2": BlockOutputsOnly(),
}
DEFAULT_FAMILY = Family()


@dataclass
class TransformersBackbone(Backbone):
    """Any transformers image backbone (``AutoModel`` + ``AutoImageProcessor``); per-family
    behaviour comes from :data:`FAMILIES`."""

    # 1: block i = hidden_states[i + family.hidden_offset]; embed as the family table defines it.
    FEATURE_VERSION: ClassVar[int] = 1

    revision: str | None = "main"
    trust_remote_code: bool = False
    # Resize and normalise on the model's device instead of in the DataLoader workers: null (auto)
    # does it on CUDA when the image processor can (a torchvision-backend processor).
    preprocess_on_device: bool | None = None

    _processor: Any = field(default=None, init=False, repr=False)
    _family: Family = field(default=DEFAULT_FAMILY, init=False, repr=False)
    _num_prefix_tokens: int = field(default=0, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        path = Path(self.name).expanduser()
        weights = dir_fingerprint(path) if path.is_dir() else f"hub:{self.name}@{self.revision}"
        return {"kind": "transformers", "name": self.name, "weights": weights}

    def _load(self) -> LayerInfo:
        from transformers import AutoConfig, AutoImageProcessor

        if self.trust_remote_code:
            log.warning("model.trust_remote_code=true: running code shipped with %s", self.name)
        path = Path(self.name).expanduser()
        looks_local = self.name.startswith(("/", ".", "~")) or self.name.count("/") > 1
        if looks_local and not path.is_dir():
            raise ConfigError(f"model.name={self.name!r} is not a directory ({path.resolve()})")
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(self.name, **kwargs)
            self._family = FAMILIES.get(config.model_type, DEFAULT_FAMILY)
            model = self._family.build(self.name, config, kwargs)
            self._processor = AutoImageProcessor.from_pretrained(self.name, **kwargs)
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise load_error("model.name", self.name, error) from error
        self._model = model
        self._pixels_on_device = self._wants_device_preprocessing()
        vision = getattr(model, "vision_model", model)
        embeddings = getattr(vision, "embeddings", None)
        has_cls = embeddings is not None and (
            hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding")
        )
        num_registers = getattr(getattr(config, "vision_config", config), "num_register_tokens", 0) or 0
        self._num_prefix_tokens = (1 if has_cls else 0) + num_registers
        # One dry batch tells the block count and whether blocks are token or feature maps.
        import torch

        probe = self.preprocess([blank_image()])
        with torch.inference_mode():
            outputs = model.eval()(pixel_values=probe, output_hidden_states=True)
        blocks = outputs.hidden_states[self._family.hidden_offset:]
        token_model = blocks[-1].ndim == 3
        pools = ("cls", "mean") if token_model and self._num_prefix_tokens > 0 else ("mean",)
        return LayerInfo(num_layers=len(blocks), block_pools=pools)

    def preprocess(self, images: list) -> Any:
        return self._processor(images=images, return_tensors="pt")["pixel_values"]

    def _wants_device_preprocessing(self) -> bool:
        capable = any(kind.__name__ in _DEVICE_PROCESSORS for kind in type(self._processor).__mro__)
        why = f"{type(self._processor).__name__} of {self.name} is not a torchvision-backend image processor"
        return device_preprocessing(self.preprocess_on_device, capable, why, self._device)

    def _finish_on_device(self, batch: Any) -> Any:
        if isinstance(batch, list):  # images of different sizes
            batch = [image.to(self._device, non_blocking=True) for image in batch]
        else:
            batch = batch.to(self._device, non_blocking=True)
        return self._processor(images=batch, return_tensors="pt", device=self._device)["pixel_values"]

    def save(self, folder: Path) -> dict[str, Any]:
        import torch

        self._model.to(memory_format=torch.contiguous_format)
        self._model.save_pretrained(folder)
        self._processor.save_pretrained(folder)
        return {"_target_": "latentmap.models.TransformersBackbone", "name": str(Path(folder).resolve()),
                "revision": "main", "trust_remote_code": False}

    def _forward(self, pixel_values: Any) -> dict[str, Any]:
        outputs = self._model(pixel_values=pixel_values, output_hidden_states=True)
        blocks = list(outputs.hidden_states[self._family.hidden_offset:])
        features = pool_blocks(blocks, self._num_prefix_tokens)
        features["embed"] = self._family.embed(outputs, self._num_prefix_tokens)
        return features
