"""transformers backbones: ``AutoConfig`` + the family's model class + ``AutoImageProcessor``, with
per-family behaviour in one table (:data:`FAMILIES`, keyed by ``config.model_type``), not branches.

A :class:`Family` says how to build the model from its checkpoint, what else its forward pass
needs, where its blocks start in ``hidden_states``, which leading tokens are prefix tokens, and
what its ``embed`` is: the representation the family's own head reads.

| family (model_type) | ``embed`` | reference the tests pin it to |
|---|---|---|
| vit, deit, vit_msn, vit_mae | final-norm [CLS] token | ``*ForImageClassification``'s classifier input (MAE: ``ViTForImageClassification`` on its weights) |
| dinov2, dinov2_with_registers | [CLS] and the mean of the patch tokens, concatenated | ``Dinov2ForImageClassification``'s classifier input |
| beit, data2vec-vision | ``pooler_output``: LayerNorm of the patch-token mean (``use_mean_pooling``), else [CLS] | ``*ForImageClassification``'s classifier input |
| convnext, convnextv2, swin, swinv2, resnet, regnet, efficientnet, mobilevit, mobilenet_v1/v2, ... | ``pooler_output`` (ConvNeXt: LayerNorm of the mean; EfficientNet: its own avg/max pool) | ``*ForImageClassification``'s classifier input |
| pvt_v2, segformer, poolformer | the mean of the final feature map (PoolFormer: of its head's GroupNorm) | ``*ForImageClassification``'s classifier input |
| pvt | the final [CLS] token (last stage) | ``PvtForImageClassification``'s classifier input |
| clip | the projected image embedding | ``CLIPModel.get_image_features`` |
| siglip, siglip2 | the vision tower's attention-pooling head (``pooler_output``) | ``SiglipModel.get_image_features`` / ``Siglip2Model.get_image_features`` |
| any other two-tower model with a ``vision_config`` | the two-tower model's ``get_image_features`` | |

Families not in the table: the final-norm [CLS] token of a model with a class token, else the
``pooler_output`` when the model has one, else the mean of the final tokens or feature map.
A ``pooler_output`` is never read where it is an untrained extra (ViT's and DeiT's dense + tanh).
"""  # noqa: E501 - the rows of a Markdown table cannot wrap

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from latentmap import hub
from latentmap.errors import ConfigError
from latentmap.models.base import (
    Backbone,
    LayerInfo,
    blank_image,
    device_preprocessing,
    dir_fingerprint,
    load_error,
    pool_blocks,
)

log = logging.getLogger(__name__)

# Image processor base classes that take tensors and a `device` (transformers 5; 4.x's fast ones).
_DEVICE_PROCESSORS = frozenset({"TorchvisionBackend", "BaseImageProcessorFast"})
# Processor outputs a model may take besides pixel_values.
_MODEL_INPUTS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


class Family:
    """How latentmap reads one family of transformers image models (these are the defaults)."""

    # The version of this family's reading (embed, blocks, prefix tokens). It is part of the cache
    # key: bump it on purpose when a change makes the family's features differ.
    version: int = 1
    # hidden_states[hidden_offset + i] is block i (hidden_states[0] is the embedding output), up to
    # hidden_end (None: the last; -1 where the last is the final norm's output, no block's).
    hidden_offset: int = 1
    hidden_end: int | None = None
    # An image-text model's text side: how its tokenizer pads prompts (SigLIP was trained on prompts
    # padded to the full length), and whether its image-text probabilities are per-class sigmoids
    # (SigLIP's pairwise loss) rather than a softmax over the classes (CLIP's).
    text_padding: Any = True
    sigmoid: bool = False
    # Modules of the model class that ``embed`` never reads: weights of theirs that the checkpoint
    # lacks (initialised at random) do not touch the features, so a run says so at INFO, not WARNING.
    unread: tuple[str, ...] = ()

    def build(self, name: str, config: Any, options: dict[str, Any]) -> Any:
        """The model of checkpoint ``name`` (its loaded ``config``), ready for ``output_hidden_states``."""
        from transformers import AutoModel

        return AutoModel.from_pretrained(name, **options)

    def tower(self, model: Any) -> Any:
        """The module whose embeddings hold the prefix tokens (a vision tower's ``vision_model``
        where the class wraps one)."""
        return getattr(model, "vision_model", model)

    def forward(self, model: Any, inputs: dict[str, Any]) -> Any:
        """The model's outputs, with every block's hidden state."""
        return model(**inputs, output_hidden_states=True)

    def embed(self, model: Any, outputs: Any, inputs: dict[str, Any], prefix: int, class_token: bool) -> Any:
        """(B, D) ``embed`` feature from the model's outputs."""
        final = outputs.last_hidden_state
        if final.ndim == 3 and class_token:  # the final-norm class token
            return final[:, 0]
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return final.mean(dim=(2, 3)) if final.ndim == 4 else final[:, prefix:].mean(dim=1)

    def token_mask(self, inputs: dict[str, Any]) -> Any:
        """(B, L) 1 for a real patch token, 0 for padding; None when every token is real."""
        return None


class ClassToken(Family):
    """The final-norm [CLS] token, as ``ViTForImageClassification`` and ``DeiTForImageClassification``
    read it (their ``pooler_output`` is an untrained dense + tanh)."""

    unread = ("pooler.",)

    def embed(self, model, outputs, inputs, prefix, class_token):
        return outputs.last_hidden_state[:, 0]


class MaskedAutoencoder(ClassToken):
    """ViT-MAE: its forward masks 75% of the patches at random. For embedding, no patch is masked and
    none is shuffled (``mask_ratio=0`` and a fixed ``noise``), so the encoder sees the whole image, as
    ``ViTForImageClassification`` does with MAE's weights, and two passes give the same features."""

    def build(self, name, config, options):
        from transformers import AutoModel

        config.mask_ratio = 0.0
        return AutoModel.from_pretrained(name, config=config, **options)

    def forward(self, model, inputs):
        import torch

        pixels = inputs["pixel_values"]
        patches = model.embeddings.patch_embeddings.num_patches
        noise = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(len(pixels), patches)
        return model(**inputs, noise=noise, output_hidden_states=True)


class ClassAndPatchMean(Family):
    """DINOv2 (with or without registers): the final [CLS] token and the mean of the final patch tokens
    (registers excluded), concatenated, as ``Dinov2ForImageClassification`` reads them."""

    def embed(self, model, outputs, inputs, prefix, class_token):
        import torch

        final = outputs.last_hidden_state
        return torch.cat([final[:, 0], final[:, prefix:].mean(dim=1)], dim=1)


class PoolerOutput(Family):
    """The model's ``pooler_output``, the input of its classification head (BEiT and data2vec-vision:
    LayerNorm of the patch-token mean; ConvNeXt: LayerNorm of the spatial mean; Swin, ResNet, RegNet,
    EfficientNet, MobileViT: the pooled final features)."""

    def embed(self, model, outputs, inputs, prefix, class_token):
        return outputs.pooler_output.flatten(1)


class MeanPooledTransformer(PoolerOutput):
    """BEiT and data2vec-vision: ``pooler_output`` is the LayerNorm of the patch-token mean when the
    config says ``use_mean_pooling`` (else the [CLS] token), built even where the base model leaves
    its pooler out by default (data2vec-vision), as their ``*ForImageClassification`` does."""

    def build(self, name, config, options):
        from transformers import AutoModel

        return AutoModel.from_pretrained(name, add_pooling_layer=True, **options)


class BlockOutputsOnly(PoolerOutput):
    """MobileNet V1/V2, MobileViT V1/V2: ``hidden_states`` hold block (stage) outputs only, no
    embedding output."""

    hidden_offset = 0


class StageOutputs(Family):
    """PVT v2, SegFormer: ``hidden_states`` hold the stage outputs only (no embedding output); no
    pooler: ``embed`` is the mean of the final feature map, as their classifiers read it."""

    hidden_offset = 0


class PoolFormerHead(StageOutputs):
    """PoolFormer: stage outputs only; its classifier reads the GroupNorm of the final map, averaged
    (the norm belongs to ``PoolFormerForImageClassification``, so that class is loaded; a base-model
    checkpoint leaves the norm at its initial, parameter-free form)."""

    unread = ("classifier.",)

    def build(self, name, config, options):
        from transformers import PoolFormerForImageClassification

        return PoolFormerForImageClassification.from_pretrained(name, **options)

    def tower(self, model):
        return model.poolformer

    def forward(self, model, inputs):
        return model.poolformer(**inputs, output_hidden_states=True)

    def embed(self, model, outputs, inputs, prefix, class_token):
        return model.norm(outputs.last_hidden_state).mean(dim=(2, 3))


class PvtClassToken(Family):
    """PVT v1: one hidden state a transformer block (no embedding output; the last is the final
    LayerNorm's), the class token in the last stage only; ``embed`` is that final [CLS] token, as
    ``PvtForImageClassification`` reads it. ``mean`` averages a block's every token."""

    hidden_offset = 0
    hidden_end = -1

    def embed(self, model, outputs, inputs, prefix, class_token):
        return outputs.last_hidden_state[:, 0]


class VisionTower(Family):
    """A two-tower (image-text) checkpoint: only its vision tower is loaded and run, with the class
    ``vision_class`` names; ``embed`` is what the two-tower model's ``get_image_features`` returns."""

    vision_class = ""

    def build(self, name, config, options):
        import transformers

        vision = getattr(transformers, self.vision_class)
        return vision.from_pretrained(name, config=getattr(config, "vision_config", config), **options)


class ClipVisionTower(VisionTower):
    """CLIP: the vision tower with its projection; ``embed`` is CLIP's projected image embedding."""

    vision_class = "CLIPVisionModelWithProjection"

    def build(self, name, config, options):
        from transformers import CLIPVisionModelWithProjection

        vision_config = getattr(config, "vision_config", config)
        vision_config.projection_dim = config.projection_dim  # top-level in CLIPConfig
        return CLIPVisionModelWithProjection.from_pretrained(name, config=vision_config, **options)

    def embed(self, model, outputs, inputs, prefix, class_token):
        return outputs.image_embeds


class SiglipVisionTower(VisionTower):
    """SigLIP: the vision tower; ``embed`` is its attention-pooling head's output."""

    vision_class = "SiglipVisionModel"
    text_padding = "max_length"
    sigmoid = True

    def embed(self, model, outputs, inputs, prefix, class_token):
        return outputs.pooler_output


class Siglip2VisionTower(SiglipVisionTower):
    """SigLIP 2 (NaFlex): patches of each image's own aspect ratio, padded to ``max_num_patches``; the
    processor's ``pixel_attention_mask`` and ``spatial_shapes`` go to the model, and ``mean`` averages
    the real patches only."""

    vision_class = "Siglip2VisionModel"

    def token_mask(self, inputs):
        return inputs.get("pixel_attention_mask")


class AnyVisionTower(Family):
    """A two-tower model latentmap has no row for (a ``vision_config`` and a ``vision_model``): the
    whole model is loaded, its vision tower gives the blocks, its ``get_image_features`` the embed."""

    def forward(self, model, inputs):
        return model.vision_model(**inputs, output_hidden_states=True)

    def embed(self, model, outputs, inputs, prefix, class_token):
        features = model.get_image_features(**inputs)
        return getattr(features, "pooler_output", features)


_POOLED = PoolerOutput()
FAMILIES: dict[str, Family] = {
    "vit": ClassToken(), "deit": ClassToken(), "vit_msn": ClassToken(), "vit_hybrid": ClassToken(),
    "vit_mae": MaskedAutoencoder(),
    "dinov2": ClassAndPatchMean(), "dinov2_with_registers": ClassAndPatchMean(),
    "beit": MeanPooledTransformer(), "data2vec-vision": MeanPooledTransformer(),
    "convnext": _POOLED, "convnextv2": _POOLED, "swin": _POOLED, "swinv2": _POOLED, "resnet": _POOLED,
    "regnet": _POOLED, "efficientnet": _POOLED, "bit": _POOLED, "focalnet": _POOLED, "van": _POOLED,
    "mobilenet_v1": BlockOutputsOnly(), "mobilenet_v2": BlockOutputsOnly(), "mobilevit": BlockOutputsOnly(),
    "mobilevitv2": BlockOutputsOnly(), "pvt_v2": StageOutputs(), "segformer": StageOutputs(),
    "poolformer": PoolFormerHead(), "pvt": PvtClassToken(),
    "clip": ClipVisionTower(), "clip_vision_model": ClipVisionTower(),
    "siglip": SiglipVisionTower(), "siglip_vision_model": SiglipVisionTower(),
    "siglip2": Siglip2VisionTower(), "siglip2_vision_model": Siglip2VisionTower(),
}
DEFAULT_FAMILY = Family()


def family_of(config: Any) -> Family:
    """The row of ``config.model_type``; a two-tower model without one gets :class:`AnyVisionTower`."""
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    if getattr(config, "vision_config", None) is not None:
        return AnyVisionTower()
    return DEFAULT_FAMILY


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' report of a checkpoint's unused and missing weights (5.x: a "LOAD
    REPORT" table; 4.x: "Some weights of ..." paragraphs), keeping it in ``held``."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" in message or message.startswith("Some weights of"):
            self.held.append(record)
            return False
        return True


@contextmanager
def _load_report_held():
    """transformers' loading report held back while a model loads (:func:`_log_loading` says it in
    a line a kind); its other warnings pass. If the load fails (transformers raises after its report
    for weights whose shapes do not fit, pointing at "the above report"), the report is let through."""
    loader, hold = logging.getLogger("transformers.modeling_utils"), _HoldLoadReport()
    loader.addFilter(hold)
    try:
        yield
    except BaseException:
        loader.removeFilter(hold)
        for record in hold.held:
            loader.handle(record)
        raise
    finally:
        loader.removeFilter(hold)


def _key_groups(keys, by_block: bool = False) -> str:
    """Up to four weight names as they are, more grouped by their first module (``text_model (196),
    logit_scale (1)``), or with ``by_block`` by their path up to the first number, which names the
    block (``layers.3 (6)``, ``vision_model.encoder.layers.0 (12)``)."""
    if len(keys) <= 4:
        return ", ".join(sorted(keys))
    groups: dict[str, int] = {}
    for key in sorted(keys):
        parts = key.split(".")
        number = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None) if by_block else None
        first = ".".join(parts[:number + 1]) if number is not None else parts[0]
        groups[first] = groups.get(first, 0) + 1
    shown = [f"{name} ({count})" for name, count in sorted(groups.items(), key=lambda item: (-item[1], item[0]))]
    return ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")


def _log_loading(name: str, loading: dict[str, Any], unread: tuple[str, ...]) -> None:
    """One line for what ``from_pretrained(..., output_loading_info=True)`` reports: checkpoint
    weights the backbone does not use (a task head, another tower) at INFO; backbone weights the
    checkpoint lacks, initialised at random, at WARNING where ``embed`` or a block reads them (a
    module in the family's ``unread`` does not), else at INFO."""
    unused = set(loading.get("unexpected_keys") or ())
    missing = set(loading.get("missing_keys") or ())
    harmless = {key for key in missing if key.startswith(unread)}
    if unused:
        log.info("%s: %d checkpoint weights not used by the backbone (a task head or another tower): %s",
                 name, len(unused), _key_groups(unused))
    if harmless:
        log.info("%s: %d weights of a module latentmap does not read are not in the checkpoint (initialised at "
                 "random, the features do not use them): %s", name, len(harmless), _key_groups(harmless))
    if missing - harmless:
        log.warning("%s: %d backbone weights are not in the checkpoint and were initialised at random, so the "
                    "features that pass through them are not the checkpoint's: %s", name, len(missing - harmless),
                    _key_groups(missing - harmless, by_block=True))


def _is_image_model(config: Any) -> bool:
    """Whether transformers knows an image processor for this model type, or it has a vision tower."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    return (config.model_type in IMAGE_PROCESSOR_MAPPING_NAMES or config.model_type in FAMILIES
            or getattr(config, "vision_config", None) is not None)


def _prefix_tokens(tower: Any, config: Any) -> tuple[int, bool]:
    """(number of prefix tokens before the patch tokens, whether the first is a class token): [CLS],
    DeiT's distillation token and DINOv2's registers are prefix tokens."""
    embeddings = getattr(tower, "embeddings", None)
    class_token = embeddings is not None and (hasattr(embeddings, "cls_token")
                                              or hasattr(embeddings, "class_embedding"))
    distillation = embeddings is not None and hasattr(embeddings, "distillation_token")
    vision_config = getattr(config, "vision_config", None) or config
    registers = getattr(vision_config, "num_register_tokens", 0) or 0
    return int(class_token) + int(distillation) + registers, class_token


# The files a tokenizer is saved as (fast, BPE, SentencePiece, WordPiece): one must be in a local checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model")


@dataclass
class TextTower:
    """An image-text model's text side: prompts to (P, D) text embeddings in the joint space, and
    the model's logit scale and bias (None where it has none)."""

    model: Any
    tokenizer: Any
    family: Family
    device: str
    max_length: int | None = None  # the text model's positions: longer prompts are cut there

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach())

    def tokens(self, prompts: list[str]) -> dict[str, Any]:
        return dict(self.tokenizer(prompts, padding=self.family.text_padding, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    def encode(self, prompts: list[str], batch_size: int = 256) -> np.ndarray:
        """(P, D) float32 text embeddings (``get_text_features``), not normalised."""
        import torch

        parts = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                inputs = {k: v.to(self.device) for k, v in self.tokens(prompts[start:start + batch_size]).items()}
                features = self.model.get_text_features(**inputs)
                features = getattr(features, "pooler_output", features)
                parts.append(features.float().cpu().numpy())
        return np.concatenate(parts).astype(np.float32)


@dataclass
class TransformersBackbone(Backbone):
    """Any transformers image backbone; per-family behaviour comes from :data:`FAMILIES`."""

    # 1: block i = hidden_states[i + 1] (MobileNet: i); embed the final [CLS] token, the CLIP image
    #    embedding, or the mean of the final feature map.
    # 2: embed is what each family's own head reads (the table above); mean excludes every prefix
    #    token (DeiT's distillation token too); MAE runs unmasked; SigLIP, SigLIP 2 as vision towers.
    FEATURE_VERSION: ClassVar[int] = 2

    revision: str | None = "main"
    trust_remote_code: bool = False
    # Resize and normalise on the model's device instead of in the DataLoader workers: null (auto)
    # does it on CUDA when the image processor can (a torchvision-backend processor).
    preprocess_on_device: bool | None = None

    _processor: Any = field(default=None, init=False, repr=False)
    _family: Family = field(default=DEFAULT_FAMILY, init=False, repr=False)
    _num_prefix_tokens: int = field(default=0, init=False, repr=False)
    _class_token: bool = field(default=False, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        path = Path(self.name).expanduser()
        if path.is_dir():
            weights = dir_fingerprint(path)
            config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            model_type = str(config.get("model_type", ""))
        else:  # a hub id: its config comes from the Hugging Face cache (or the hub), not its weights
            weights = f"hub:{self.name}@{self.revision}"
            model_type = self._config().model_type
        family = FAMILIES.get(model_type, DEFAULT_FAMILY)
        return {"kind": "transformers", "name": self.name, "weights": weights,
                "family": f"{model_type}:{type(family).__name__}:{family.version}"}

    def _options(self) -> dict[str, Any]:
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def _config(self) -> Any:
        from transformers import AutoConfig

        path = Path(self.name).expanduser()
        looks_local = self.name.startswith(("/", ".", "~")) or self.name.count("/") > 1
        if looks_local and not path.is_dir():
            raise ConfigError(f"model.name={self.name!r} is not a directory ({path.resolve()})")
        if not path.is_dir():
            hub.use_cache_if_offline(f"model.name={self.name!r}")
        try:
            return AutoConfig.from_pretrained(self.name, **self._options())
        except (OSError, ValueError, KeyError) as error:
            raise load_error("model.name", self.name, error) from error

    def _load(self) -> LayerInfo:
        from transformers import AutoImageProcessor

        if self.trust_remote_code:
            log.warning("model.trust_remote_code=true: running code shipped with %s", self.name)
        config = self._config()
        if not _is_image_model(config):
            raise ConfigError(
                f"model.name={self.name!r} is a {config.model_type!r} model, not an image model: model=hf takes "
                "transformers image backbones (e.g. vit, deit, dinov2, beit, convnext, swin, resnet) and the "
                "vision towers of image-text models (clip, siglip, siglip2)")
        channels = getattr(getattr(config, "vision_config", None) or config, "num_channels", 3)
        if channels != 3:  # a one-channel (or four-channel) model met RGB pixels: "Expected 1 but got 3"
            raise ConfigError(f"model.name={self.name!r} takes images of {channels} channel{'s' * (channels != 1)} "
                              "(its config's num_channels); latentmap feeds every model RGB images (3 channels): "
                              "use a model made for RGB images")
        self._family = family_of(config)
        try:
            with _load_report_held():  # transformers' table of keys, said here in one line instead
                built = self._family.build(self.name, config, {**self._options(), "output_loading_info": True})
            # (model, info); a remote-code class may ignore output_loading_info and return the model
            model, loading = built if isinstance(built, tuple) else (built, {})
            _log_loading(self.name, loading, self._family.unread)
            self._processor = AutoImageProcessor.from_pretrained(self.name, **self._options())
        except (OSError, ValueError, KeyError) as error:
            raise load_error("model.name", self.name, error) from error
        except RuntimeError as error:  # e.g. weights whose shapes do not fit (transformers' report above)
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise ConfigError(f"model.name={self.name!r}: its weights could not be loaded into the model its "
                              f"config describes ({first})") from error
        self._model = model
        self._pixels_on_device = self._wants_device_preprocessing()
        # One dry batch tells the block count and whether blocks are token or feature maps.
        import torch

        with torch.inference_mode():
            try:
                self._num_prefix_tokens, self._class_token = _prefix_tokens(self._family.tower(model), config)
                inputs = self.preprocess([blank_image()])
                outputs = self._family.forward(model.eval(), inputs)
                self._family.embed(model, outputs, inputs, self._num_prefix_tokens, self._class_token)  # reads it
            except (TypeError, ValueError, RuntimeError, AttributeError) as error:
                raise ConfigError(
                    f"model.name={self.name!r} ({config.model_type}) cannot be read by latentmap: its forward pass on "
                    f"an image failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                    "model=hf takes image backbones and the vision towers of image-text models") from error
        hidden = getattr(outputs, "hidden_states", None)
        if not hidden:
            raise ConfigError(f"model.name={self.name!r} ({config.model_type}) returns no hidden states, so latentmap "
                              "cannot read its blocks; use model=timm for a timm version of the architecture")
        blocks = hidden[self._family.hidden_offset:self._family.hidden_end]
        pools = ("cls", "mean") if blocks[-1].ndim == 3 and self._class_token else ("mean",)
        return LayerInfo(num_layers=len(blocks), block_pools=pools)

    def has_text_config(self) -> bool:
        """Whether the checkpoint is an image-text model's (its config has a text side), read from the
        config alone: what tells an image-only model from a text tower that cannot be used."""
        return getattr(self._config(), "text_config", None) is not None

    def text_family(self) -> Family | None:
        """The family of the checkpoint's text side (read from its config, nothing loaded), or None for
        an image-only model or a local checkpoint saved without its tokenizer."""
        config = self._config()
        if getattr(config, "text_config", None) is None:
            return None
        folder = Path(self.name).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            # transformers would make an empty tokenizer of the family and carry on: prompts as noise
            log.warning("zero-shot: %s has a text tower but no tokenizer (none of %s)", self.name,
                        ", ".join(TOKENIZER_FILES))
            return None
        return family_of(config)

    def text_tower(self) -> TextTower | None:
        """The text side of an image-text model (a ``text_config`` and ``get_text_features``), loaded
        whole with its tokenizer; None where :meth:`text_family` is None or it cannot be loaded."""
        family = self.text_family()
        if family is None:
            return None
        config = self._config()
        from transformers import AutoModel, AutoTokenizer

        try:
            model = AutoModel.from_pretrained(self.name, **self._options())
            tokenizer = AutoTokenizer.from_pretrained(self.name, **self._options())
        except (OSError, ValueError, KeyError, TypeError) as error:  # e.g. a checkpoint saved without its tokenizer
            log.warning("zero-shot: the text tower of %s cannot be loaded (%s: %s)", self.name, type(error).__name__,
                        str(error).splitlines()[0][:200] if str(error) else "")
            return None
        if not hasattr(model, "get_text_features"):
            log.warning("zero-shot: %s has a text config, but its model (%s) has no get_text_features to encode "
                        "prompts with", self.name, type(model).__name__)
            return None
        positions = getattr(config.text_config, "max_position_embeddings", None)
        limit = min(int(positions or 10**9), int(getattr(tokenizer, "model_max_length", None) or 10**9))
        return TextTower(model.to(self._device).eval(), tokenizer, family, self._device,
                         limit if limit < 10**9 else None)

    def preprocess(self, images: list) -> Any:
        """The model's inputs: pixel values, and the attention mask and spatial shapes of a NaFlex
        processor (SigLIP 2), as a dict of CPU tensors."""
        processed = self._processor(images=images, return_tensors="pt")
        return {name: processed[name] for name in _MODEL_INPUTS if name in processed}

    def _wants_device_preprocessing(self) -> bool:
        capable = any(kind.__name__ in _DEVICE_PROCESSORS for kind in type(self._processor).__mro__)
        why = f"{type(self._processor).__name__} of {self.name} is not a torchvision-backend image processor"
        return device_preprocessing(self.preprocess_on_device, capable, why, self._device)

    def _finish_on_device(self, batch: Any) -> Any:
        if isinstance(batch, list):  # images of different sizes
            batch = [image.to(self._device, non_blocking=True) for image in batch]
        else:
            batch = batch.to(self._device, non_blocking=True)
        processed = self._processor(images=batch, return_tensors="pt", device=self._device)
        return {name: processed[name] for name in _MODEL_INPUTS if name in processed}

    def save(self, folder: Path) -> dict[str, Any]:
        import torch

        self._model.to(memory_format=torch.contiguous_format)
        self._model.save_pretrained(folder)
        self._processor.save_pretrained(folder)
        return {"_target_": "latentmap.models.TransformersBackbone", "name": str(Path(folder).resolve()),
                "revision": "main", "trust_remote_code": False}

    def _forward(self, inputs: Any) -> dict[str, Any]:
        outputs = self._family.forward(self._model, inputs)
        blocks = list(outputs.hidden_states[self._family.hidden_offset:self._family.hidden_end])
        features = pool_blocks(blocks, self._num_prefix_tokens, self._class_token, self._family.token_mask(inputs))
        features["embed"] = self._family.embed(self._model, outputs, inputs, self._num_prefix_tokens,
                                               self._class_token)
        return features
