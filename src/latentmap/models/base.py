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

import abc
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from latentmap import settings
from latentmap.errors import ConfigError, is_network_error

log = logging.getLogger(__name__)

POOLS = settings.MAPPING["pool"].choices  # embed, cls, mean


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
    settings.require("pool", pool)
    settings.require("layer", layer)
    if pool == "embed":
        if layer != -1:
            if info.num_layers == 0:
                raise ConfigError(f"layer={layer}: {model_name} has no blocks to read, only its embedding: "
                                  "set layer=-1")
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
            "use " + " or ".join(f"pool={p}" for p in (*info.block_pools, "embed"))
        )
    n = info.num_layers
    if not -n <= layer < n:
        raise ConfigError(
            f"layer={layer} is out of range for {model_name}, which has {n} blocks: "
            f"use {-n}..{n - 1} (every block, as a sweep: -m layer='range(0,{n})')"
        )
    return feature_name(layer % n, pool)


def depth_tags(feature: str, num_layers: int) -> dict[str, str]:
    """Where in the network a feature sits: block index and relative depth (0 first, 1 last), as
    run tags. ``embed`` (after the final norm and pooling) counts as depth 1, index ``num_layers``."""
    if feature == "embed":
        return {"num_layers": str(num_layers), "layer_index": str(num_layers), "relative_depth": "1.0"}
    index = int(feature[len("layer"):].split(".")[0])
    depth = index / (num_layers - 1) if num_layers > 1 else 1.0
    return {"num_layers": str(num_layers), "layer_index": str(index), "relative_depth": f"{depth:.6g}"}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (weights files are hashed once per run, in chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dir_fingerprint(path: Path) -> str:
    """Fingerprint of a local checkpoint folder: the bytes of every file in it."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def auto_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available here: use device=auto or cpu")
    if device == "mps" and not torch.backends.mps.is_available():  # Apple's GPU, on a Mac with torch's mps
        raise ConfigError("device='mps' but MPS (Apple's GPU) is not available here: use device=auto or cpu")
    return device


@dataclass
class Backbone(abc.ABC):
    """Common interface. Subclasses implement ``identity``, ``_load``, ``preprocess`` and
    ``_forward``, and set ``FEATURE_VERSION``."""

    # The version of what this class's features mean (preprocessing, which tensor each pool reads).
    # It is part of every cache key: bump it on purpose, with a comment saying why, whenever a change
    # would make the features differ, so that entries written before are never served again.
    FEATURE_VERSION: ClassVar[int]
    # Whether it has weights to fine-tune (scripts/finetune.py refuses a backbone without).
    TRAINABLE: ClassVar[bool] = True
    # Whether it has blocks to read (similarity.py and layer studies compare blocks).
    BLOCKS: ClassVar[bool] = True

    name: str

    _model: Any = field(default=None, init=False, repr=False)
    _device: str = field(default="cpu", init=False, repr=False)
    _info: LayerInfo | None = field(default=None, init=False, repr=False)
    _precision: str = field(default="fp32", init=False, repr=False)
    # Whether preprocessing finishes on the device (set by ``_load``; see ``prepare``).
    _pixels_on_device: bool = field(default=False, init=False, repr=False)

    @abc.abstractmethod
    def identity(self) -> dict[str, Any]:
        """What determines this backbone's features, for the cache key (cheap, no weights load)."""

    def load(self, device: str = "auto", precision: str = "fp32") -> LayerInfo:
        """Load weights and preprocessing onto ``device``; return what the model can produce.

        ``precision`` (fp32, bf16 or fp16) is the autocast dtype of the forward pass; weights stay
        float32 and features come out as float32 either way.
        """
        self._precision = precision
        if self._model is None:
            self._device = auto_device(device)
            self._info = self._load()
            # channels-last speeds up convolutions on CPUs (oneDNN's preferred layout)
            # and leaves every value unchanged.
            import torch

            self._model.to(self._device, memory_format=torch.channels_last).eval()
        return self._info

    @property
    def device(self) -> str:
        return self._device

    @abc.abstractmethod
    def _load(self) -> LayerInfo:
        """Build the model (``self._model``) and its preprocessing; return what it can produce."""

    @abc.abstractmethod
    def preprocess(self, images: list) -> Any:
        """RGB PIL images -> the model's input batch on the CPU (a (B, C, H, W) tensor for a network)."""

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
        """uint8 pixels from ``prepare`` -> the model's input tensor on its device (only backbones
        that set ``_pixels_on_device`` in ``_load`` are asked)."""
        raise TypeError(f"{type(self).__name__} does not finish preprocessing on a device")

    def _model_input(self, batch: Any) -> Any:
        """A batch from ``prepare`` -> the model's input on its device: a tensor, or a mapping of
        tensors for models that take more than pixels (SigLIP 2: attention mask, spatial shapes)."""
        import torch

        if self._pixels_on_device:
            return self._finish_on_device(batch)
        if isinstance(batch, Mapping):
            return {name: _to_device(value, self._device) for name, value in batch.items()}
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

    @abc.abstractmethod
    def _forward(self, pixel_values: Any) -> dict[str, Any]:
        """Model input on the device -> every feature of the batch: ``embed`` and each block's
        pools (see :func:`pool_blocks`), as (B, D) tensors."""

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


def pool_blocks(blocks: list, num_prefix_tokens: int, class_token: bool, token_mask: Any = None) -> dict[str, Any]:
    """Pool block outputs: (B, L, D) token maps or (B, C, H, W) feature maps -> (B, D) each.

    ``cls`` is token 0, offered only when it is a class token (``class_token``); ``mean`` averages
    the tokens after the ``num_prefix_tokens`` prefix tokens ([CLS], distillation, registers), over
    the valid ones only when ``token_mask`` (B, L - prefix) marks padding (SigLIP 2's NaFlex), or
    a feature map over H and W.
    """
    pooled = {}
    for index, block in enumerate(blocks):
        if block.ndim == 4:  # CNN feature map
            pooled[feature_name(index, "mean")] = block.mean(dim=(2, 3))
        elif block.ndim == 3:  # tokens
            if class_token:
                pooled[feature_name(index, "cls")] = block[:, 0]
            tokens = block[:, num_prefix_tokens:]
            if token_mask is None:
                pooled[feature_name(index, "mean")] = tokens.mean(dim=1)
            else:
                weights = token_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
                pooled[feature_name(index, "mean")] = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        else:
            raise ValueError(f"unexpected block output of shape {tuple(block.shape)}")
    return pooled


def device_preprocessing(setting: Any, capable: bool, why_not: str, device: str) -> bool:
    """Whether to finish preprocessing on the device: ``model.preprocess_on_device`` (true, false
    or null: on CUDA when the backbone can), refused in one line where it cannot."""
    settings.require("model.preprocess_on_device", setting)
    if setting and not capable:
        raise ConfigError(f"model.preprocess_on_device=true, but {why_not}, so it cannot run on a device: "
                          "use model.preprocess_on_device=null")
    return capable and (setting or (setting is None and device.startswith("cuda")))


def batch_length(batch: Any) -> int:
    """How many images a batch from ``Backbone.prepare`` holds (a tensor or array, a list of
    tensors, or a mapping of model inputs led by ``pixel_values``)."""
    if isinstance(batch, Mapping):
        return len(batch["pixel_values"])
    return len(batch)


def _to_device(tensor: Any, device: str) -> Any:
    """A tensor on ``device``; 4-D image batches channels-last (faster convolutions, same values)."""
    import torch

    if tensor.ndim == 4 and tensor.is_floating_point():
        return tensor.to(device, memory_format=torch.channels_last, non_blocking=True)
    return tensor.to(device, non_blocking=True)


def uint8_pixels(images: list) -> Any:
    """RGB PIL images -> a (B, 3, H, W) uint8 tensor, or a list of (3, H, W) ones when their sizes
    differ: a quarter of the bytes of float32 pixels, for preprocessing on the device."""
    import torch

    tensors = [torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1) for image in images]
    if len({tuple(tensor.shape) for tensor in tensors}) == 1:
        return torch.stack(tensors)
    return [tensor.contiguous() for tensor in tensors]


def blank_image():
    from PIL import Image

    return Image.new("RGB", (64, 64), (128, 128, 128))


def load_error(key: str, name: str, error: BaseException,
               offline: str = "point {key} at a local save_pretrained directory") -> ConfigError:
    """Turn a failed download or load into one line that says whether the network, the name or a
    local directory's contents are at fault. ``offline`` is the way round the network (timm: a
    local checkpoint file, not a directory)."""
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if is_network_error(error):
        return ConfigError(
            f"{key}={name!r} could not be downloaded: the network (Hugging Face hub) is "
            f"unreachable. Run once with network access to fill the local cache, or {offline.format(key=key)}"
        )
    if Path(name).expanduser().is_dir():
        return ConfigError(
            f"{key}={name!r} is a local directory that could not be loaded ({reason}): it needs the files "
            "save_pretrained writes (config.json, the weights, and the image processor's preprocessor_config.json)"
        )
    return ConfigError(f"{key}={name!r} could not be loaded: it is not a local directory and not a known "
                       f"model name ({reason})")


