"""The family matrix: for every popular vision family, a tiny random checkpoint saved with
``save_pretrained`` and read back through ``model=hf`` (or a timm model), and each feature pinned
to the library's own computation:

* ``embed`` equals the input of the family's own head, captured from the library (a forward
  pre-hook on the ``*ForImageClassification`` classifier) or its ``get_image_features``;
* ``layer=i pool=cls|mean`` equals a direct ``output_hidden_states`` call (every prefix token,
  [CLS], distillation and registers, left out of ``mean``);
* two extractions are identical (MAE's random masking included);
* a family without a class token refuses ``pool=cls`` in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentmap import data
from latentmap.errors import ConfigError
from latentmap.extract import extract
from latentmap.models import TimmBackbone, TransformersBackbone, resolve_feature

from helpers import extraction

_TOKENS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
_STAGES = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2])
_TEXT = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=100)


def _vit_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": 32, "width": 32})


def _cnn_processor():
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=1.0)


def _build(family: str):
    """(model, image processor) of a tiny random checkpoint of ``family``."""
    import transformers as T

    builders = {
        "vit": lambda: T.ViTModel(T.ViTConfig(**_TOKENS), add_pooling_layer=False),
        "deit": lambda: T.DeiTModel(T.DeiTConfig(**_TOKENS), add_pooling_layer=False),
        "dinov2": lambda: T.Dinov2Model(T.Dinov2Config(**{**_TOKENS, "intermediate_size": None}, mlp_ratio=2)),
        "dinov2_with_registers": lambda: T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
            **{**_TOKENS, "intermediate_size": None}, mlp_ratio=2, num_register_tokens=2)),
        "beit": lambda: T.BeitModel(T.BeitConfig(**_TOKENS, use_mean_pooling=True)),
        "data2vec-vision": lambda: T.Data2VecVisionModel(T.Data2VecVisionConfig(**_TOKENS, use_mean_pooling=True)),
        "vit_mae": lambda: T.ViTMAEModel(T.ViTMAEConfig(**_TOKENS, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                                        decoder_num_attention_heads=2, decoder_intermediate_size=32)),
        "convnext": lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
        "convnextv2": lambda: T.ConvNextV2Model(T.ConvNextV2Config(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
        "swin": lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                 num_heads=[1, 2], window_size=4)),
        "swinv2": lambda: T.Swinv2Model(T.Swinv2Config(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1],
                                                       num_heads=[1, 2], window_size=4)),
        "resnet": lambda: T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])),
        "regnet": lambda: T.RegNetModel(T.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                       groups_width=8)),
        "efficientnet": lambda: T.EfficientNetModel(T.EfficientNetConfig(
            image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, pooling_type="max")),
        "mobilevit": lambda: T.MobileViTModel(T.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 16, 16, 16, 16, 32],
            num_attention_heads=2)),
        "pvt_v2": lambda: T.PvtV2Model(T.PvtV2Config(image_size=32, **_STAGES)),
        "segformer": lambda: T.SegformerModel(T.SegformerConfig(**_STAGES, decoder_hidden_size=16)),
        "poolformer": lambda: T.PoolFormerModel(T.PoolFormerConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                                                   num_encoder_blocks=4)),
        "pvt": lambda: T.PvtModel(T.PvtConfig(image_size=32, **_STAGES, num_encoder_blocks=4)),
        "clip": lambda: T.CLIPModel(T.CLIPConfig(text_config=_TEXT, vision_config=_TOKENS, projection_dim=12)),
        "siglip": lambda: T.SiglipModel(T.SiglipConfig(text_config=_TEXT, vision_config=_TOKENS)),
        "siglip2": lambda: T.Siglip2Model(T.Siglip2Config(text_config=_TEXT, vision_config={
            **{k: v for k, v in _TOKENS.items() if k != "image_size"}, "num_patches": 16})),
    }
    processors = {
        "mobilevit": lambda: T.MobileViTImageProcessor(size={"shortest_edge": 32},
                                                       crop_size={"height": 32, "width": 32}),
        "clip": lambda: T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        "siglip": lambda: T.SiglipImageProcessor(size={"height": 32, "width": 32}),
        "siglip2": lambda: T.Siglip2ImageProcessor(patch_size=8, max_num_patches=16),
    }
    cnn = {"convnext", "convnextv2", "resnet", "regnet", "efficientnet", "poolformer"}
    torch.manual_seed(0)
    model = builders[family]()
    processor = processors.get(family, _cnn_processor if family in cnn else _vit_processor)()
    return model, processor


# Prefix tokens before the patch tokens, and whether the first is a class token (None: feature maps).
PREFIX = {"vit": (1, True), "deit": (2, True), "dinov2": (1, True), "dinov2_with_registers": (3, True),
          "beit": (1, True), "data2vec-vision": (1, True), "vit_mae": (1, True), "clip": (1, True),
          "siglip": (0, False), "siglip2": (0, False), "swin": (0, False), "swinv2": (0, False),
          "convnext": None, "convnextv2": None, "resnet": None, "regnet": None, "efficientnet": None,
          "mobilevit": None, "pvt_v2": (0, False), "segformer": (0, False), "poolformer": (0, False),
          "pvt": (0, False)}
TWO_TOWERS = {"clip", "siglip", "siglip2"}
# Families whose hidden_states hold their stages' (PVT v1: its blocks') outputs and no embedding output
# (read in transformers' encoders), with the count of stages or blocks their config builds: every
# one of them is a block (PVT v1's last hidden state is its final LayerNorm's, no block's).
STAGES = {"mobilevit": 5, "pvt_v2": 4, "segformer": 4, "poolformer": 4, "pvt": 4}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six small images of three sizes (SigLIP 2 keeps each aspect ratio: its patch counts differ)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("family-images")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (48, 24), (24, 40)] * 2):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return data.ImageFolderSource(path=str(root)).load(seed=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> folder of its tiny checkpoint, built on first use."""
    root = tmp_path_factory.mktemp("families")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            model, processor = _build(family)
            made[family] = root / family
            model.save_pretrained(made[family])
            processor.save_pretrained(made[family])
        return made[family]

    return get


def _pil(dataset) -> list:
    return [data.decode_rgb(record, i, data.PIL_MAX_IMAGE_PIXELS)
            for i, record in enumerate(data.undecoded(dataset)["image"])]


def _reference(family: str, path: Path, images: list) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """(embed, block outputs, processor outputs) computed with transformers alone."""
    import transformers as T

    inputs = dict(T.AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt"))
    pixel_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    with torch.no_grad():
        if family in TWO_TOWERS:
            whole = T.AutoModel.from_pretrained(path).eval()
            embed = whole.get_image_features(**pixel_inputs)
            embed = getattr(embed, "pooler_output", embed)
            blocks = whole.vision_model(**pixel_inputs, output_hidden_states=True).hidden_states[1:]
        else:
            if family == "vit_mae":  # MAE's encoder on every patch is ViT with MAE's weights
                head_model = T.ViTForImageClassification.from_pretrained(path).eval()
                base = T.ViTModel.from_pretrained(path, add_pooling_layer=False).eval()
            else:
                head_model = T.AutoModelForImageClassification.from_pretrained(path).eval()
                base = T.AutoModel.from_pretrained(path).eval()
            captured = []
            head_model.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
            head_model(**pixel_inputs)
            embed = captured[0].flatten(1)
            hidden = base(**pixel_inputs, output_hidden_states=True).hidden_states
            blocks = hidden[1:] if family not in STAGES else hidden[:-1] if family == "pvt" else hidden
            assert family not in STAGES or len(blocks) == STAGES[family], (family, len(hidden))
    return embed.numpy(), [b.numpy() for b in blocks], inputs


@pytest.mark.parametrize("family", list(PREFIX))
def test_every_feature_equals_the_library_and_repeats_exactly(family, checkpoints, images, tmp_path):
    path = checkpoints(family)
    backbone = TransformersBackbone(name=str(path))
    info = backbone.load("cpu")
    ours = extract(backbone, images, extraction(batch_size=4), progress=False)
    again = TransformersBackbone(name=str(path))
    again.load("cpu")
    repeat = extract(again, images, extraction(batch_size=3), progress=False)
    assert ours.keys() == repeat.keys()
    for name in ours:  # deterministic and complete: two passes (other batch sizes) agree
        np.testing.assert_allclose(repeat[name], ours[name], atol=1e-6, rtol=1e-6, err_msg=name)
    if family == "vit_mae":  # the random masking is gone: bit-identical at the same batch size
        twice = extract(again, images, extraction(batch_size=4), progress=False)
        assert all(np.array_equal(twice[name], ours[name]) for name in ours)

    embed, blocks, inputs = _reference(family, path, _pil(images))
    np.testing.assert_allclose(ours["embed"], embed, atol=1e-5, rtol=1e-5, err_msg=f"{family} embed")
    assert info.num_layers == len(blocks)
    prefix = PREFIX[family]
    mask = inputs.get("pixel_attention_mask")
    for index, block in enumerate(blocks):
        if block.ndim == 4:
            np.testing.assert_allclose(ours[f"layer{index:03d}.mean"], block.mean(axis=(2, 3)), atol=1e-5, rtol=1e-5)
            continue
        count, class_token = prefix
        tokens = block[:, count:]
        if mask is not None:  # NaFlex padding: only the real patches count
            weights = mask.numpy()[..., None].astype(np.float32)
            mean = (tokens * weights).sum(1) / weights.sum(1)
        else:
            mean = tokens.mean(axis=1)
        np.testing.assert_allclose(ours[f"layer{index:03d}.mean"], mean, atol=1e-5, rtol=1e-5,
                                   err_msg=f"{family} block {index} mean")
        assert (f"layer{index:03d}.cls" in ours) == class_token
        if class_token:
            np.testing.assert_allclose(ours[f"layer{index:03d}.cls"], block[:, 0], atol=1e-5, rtol=1e-5)
    if prefix is None or not prefix[1]:
        with pytest.raises(ConfigError, match=rf"pool=cls is not available for {path} \(it has no class token\)"):
            resolve_feature(0, "cls", info, str(path))


def test_mae_is_deterministic_where_the_library_is_not(checkpoints, images):
    """The library's own forward masks 75% of MAE's patches at random: two calls differ."""
    from transformers import AutoImageProcessor, ViTMAEModel

    path = checkpoints("vit_mae")
    model = ViTMAEModel.from_pretrained(path).eval()
    pixels = AutoImageProcessor.from_pretrained(path)(images=_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        first, second = (model(pixel_values=pixels).last_hidden_state[:, 0] for _ in range(2))
    assert not torch.allclose(first, second)


def test_a_model_that_is_not_an_image_model_is_one_line_a_failed_run_and_no_cache(class_folder, tmp_path):
    from transformers import BertConfig, BertModel

    from latentmap.runner import run

    from helpers import cache_entries, compose, mlflow_runs

    BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         vocab_size=50)).save_pretrained(tmp_path / "bert")
    message = r"model.name=.*bert' is a 'bert' model, not an image model: model=hf takes"
    with pytest.raises(ConfigError, match=message):
        run(compose(["model=hf", f"model.name={tmp_path / 'bert'}", "dataset=imagefolder",
                     f"dataset.path={class_folder}", "reducer=pca", "metrics.k=5"], tmp_path / "out"))
    _, (logged,) = mlflow_runs(tmp_path / "out")
    assert logged.info.status == "FAILED" and "not an image model" in logged.data.tags["error"]
    cache = tmp_path / "out" / "cache"
    assert not cache.exists() or cache_entries(cache) == []


def test_a_model_of_one_channel_images_is_one_line(tmp_path):
    """A ViT made for one-channel images met latentmap's RGB pixels: "Expected 1 but got 3", blamed on
    the model's kind; the line names the channels."""
    import transformers as T

    T.ViTModel(T.ViTConfig(**_TOKENS, num_channels=1)).save_pretrained(tmp_path / "grey")
    _vit_processor().save_pretrained(tmp_path / "grey")
    with pytest.raises(ConfigError, match=r"takes images of 1 channel \(its config's num_channels\); latentmap "
                                          r"feeds every model RGB images"):
        TransformersBackbone(name=str(tmp_path / "grey")).load("cpu")


def test_the_family_version_is_in_the_cache_key(checkpoints, monkeypatch):
    from latentmap.models.hf import FAMILIES

    path = checkpoints("beit")
    before = TransformersBackbone(name=str(path)).identity()
    assert before["family"] == "beit:MeanPooledTransformer:1"
    monkeypatch.setattr(type(FAMILIES["beit"]), "version", 2)
    assert TransformersBackbone(name=str(path)).identity()["family"] == "beit:MeanPooledTransformer:2"


def test_timm_models_whose_class_token_joins_late_read_their_patch_blocks(images):
    """CaiT (and XCiT): the class token joins in the last, class-attention blocks, and their
    forward_intermediates takes no return_prefix_tokens (a traceback before, pool=embed too): the
    blocks are the patch-token maps it gives, mean-pooled; embed is forward_head(pre_logits=True)."""
    torch.manual_seed(0)
    backbone = TimmBackbone(name="cait_xxs24_224", pretrained=False)
    info = backbone.load("cpu")
    ours = extract(backbone, images, extraction(batch_size=3), progress=False)
    model, pixels = backbone._model, backbone.preprocess(_pil(images))
    with torch.no_grad():
        embed = model.forward_head(model.forward_features(pixels), pre_logits=True)
        maps = model.forward_intermediates(pixels, intermediates_only=True)
    np.testing.assert_allclose(ours["embed"], embed.numpy(), atol=1e-5, rtol=1e-5)
    assert info.num_layers == len(maps) == len(model.blocks) and info.block_pools == ("mean",)
    for index in (0, len(maps) - 1):
        np.testing.assert_allclose(ours[f"layer{index:03d}.mean"], maps[index].mean(dim=(2, 3)).numpy(), atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("name,prefix", [
    ("test_vit", (1, True)),
    ("test_vit2", (1, False)),  # a register token and no class token
    ("deit_tiny_distilled_patch16_224", (2, True)),  # [CLS] and the distillation token
])
def test_timm_token_families_pool_their_blocks_as_timm_runs_them(name, prefix, images):
    """Blocks read from forward_intermediates equal each block's own output (a forward hook on the
    model's blocks), with every prefix token left out of mean; embed is timm's
    forward_head(pre_logits=True); two extractions are identical."""
    torch.manual_seed(0)
    backbone = TimmBackbone(name=name, pretrained=False)
    info = backbone.load("cpu")
    ours = extract(backbone, images, extraction(batch_size=4), progress=False)
    twice = extract(backbone, images, extraction(batch_size=4), progress=False)
    assert all(np.array_equal(twice[k], ours[k]) for k in ours)
    model, outputs = backbone._model, []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: outputs.append(output))
    with torch.no_grad():
        embed = model.forward_head(model.forward_features(backbone.preprocess(_pil(images))), pre_logits=True)
    np.testing.assert_allclose(ours["embed"], embed.numpy(), atol=1e-5, rtol=1e-5)
    count, class_token = prefix
    assert model.num_prefix_tokens == count and info.num_layers == len(outputs) == len(model.blocks)
    for index, block in enumerate(outputs):
        np.testing.assert_allclose(ours[f"layer{index:03d}.mean"], block[:, count:].mean(1).numpy(),
                                   atol=1e-5, rtol=1e-5)
        assert (f"layer{index:03d}.cls" in ours) == class_token
        if class_token:
            np.testing.assert_allclose(ours[f"layer{index:03d}.cls"], block[:, 0].numpy(), atol=1e-5, rtol=1e-5)
    if not class_token:
        with pytest.raises(ConfigError, match="it has no class token"):
            resolve_feature(0, "cls", info, name)
