"""The embedding the harness produces for each layer and pooling equals a direct library call."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentmap import cache, data
from latentmap.errors import ConfigError
from latentmap.models import (
    LayerInfo,
    PixelsBackbone,
    TimmBackbone,
    TransformersBackbone,
    map_state_dict_by_order,
    resolve_feature,
)

from helpers import extraction


def _folder_images(root: Path):
    """The images of ``root`` in imagefolder order (sorted classes, sorted files), as RGB PIL."""
    from PIL import Image

    return [Image.open(p).convert("RGB") for d in sorted(root.iterdir()) for p in sorted(d.iterdir())]


def _harness(backbone, folder, layer, pool, cache_dir):
    dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
    return cache.embeddings(backbone, dataset, layer=layer, pool=pool, cache_dir=cache_dir,
                            how=extraction(batch_size=5, device="cpu")).values


def _hf_reference(path: Path, images, layer_index: int | None, pool: str) -> np.ndarray:
    """Direct transformers call: processor -> model(output_hidden_states) -> the named feature."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

    processor = AutoImageProcessor.from_pretrained(path)
    config = AutoConfig.from_pretrained(path)
    is_clip = config.model_type == "clip"
    if is_clip:
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
        model = CLIPVisionModelWithProjection.from_pretrained(path, config=vision_config).eval()
    else:
        model = AutoModel.from_pretrained(path).eval()
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    if pool == "embed":
        if is_clip:  # the whole CLIP model's own image-feature call, an independent path
            from transformers import CLIPModel

            clip = CLIPModel.from_pretrained(path).eval()
            with torch.no_grad():
                features = clip.get_image_features(pixel_values=pixel_values)
            features = getattr(features, "pooler_output", features)
            return features.numpy()
        final = out.last_hidden_state
        return (final.mean(dim=(2, 3)) if final.ndim == 4 else final[:, 0]).numpy()
    block = out.hidden_states[layer_index + 1]  # hidden_states[0] is the embedding output
    if block.ndim == 4:
        return block.mean(dim=(2, 3)).numpy()
    return (block[:, 0] if pool == "cls" else block[:, 1:].mean(dim=1)).numpy()


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_clip", "tiny_resnet"])
def test_transformers_features_equal_direct_call(fixture, request, class_folder, tmp_path):
    path = request.getfixturevalue(fixture)
    images = _folder_images(class_folder)
    backbone = TransformersBackbone(name=str(path))
    info = backbone.load("cpu")
    n_blocks = {"tiny_vit": 3, "tiny_clip": 2, "tiny_resnet": 3}[fixture]
    assert info.num_layers == n_blocks
    cases = [(-1, "embed")] + [(layer, pool) for layer in range(-n_blocks, n_blocks) for pool in info.block_pools]
    for layer, pool in cases:
        ours = _harness(backbone, class_folder, layer, pool, tmp_path / "cache")
        reference = _hf_reference(path, images, layer % n_blocks if pool != "embed" else None, pool)
        np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5, err_msg=f"{fixture} {layer} {pool}")


def test_vit_embed_is_final_layernorm_cls_not_last_block(tiny_vit, class_folder, tmp_path):
    backbone = TransformersBackbone(name=str(tiny_vit))
    embed = _harness(backbone, class_folder, -1, "embed", tmp_path)
    last_block_cls = _harness(backbone, class_folder, -1, "cls", tmp_path)
    assert not np.allclose(embed, last_block_cls, atol=1e-3)  # the final LayerNorm is not a block


@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet", "test_convnext"])
def test_timm_features_equal_forward_intermediates(name, class_folder, tmp_path):
    torch.manual_seed(0)
    backbone = TimmBackbone(name=name, pretrained=False)
    info = backbone.load("cpu")
    model = backbone._model
    pixel_values = backbone.preprocess(_folder_images(class_folder))
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(pixel_values), pre_logits=True).numpy()
    np.testing.assert_allclose(_harness(backbone, class_folder, -1, "embed", tmp_path), pre_logits,
                               atol=1e-5, rtol=1e-5)
    from latentmap.extract import extract

    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    first, second = (extract(backbone, dataset, extraction(batch_size=5), progress=False) for _ in range(2))
    assert all(np.array_equal(first[name], second[name]) for name in first)  # deterministic
    for layer in range(info.num_layers):
        for pool in info.block_pools:
            with torch.no_grad():
                if pool == "cls" or backbone._num_prefix_tokens:
                    (tokens, prefix), = model.forward_intermediates(
                        pixel_values, indices=[layer], intermediates_only=True,
                        return_prefix_tokens=True, output_fmt="NLC")
                    reference = prefix[:, 0] if pool == "cls" else tokens.mean(dim=1)
                else:
                    feature_map, = model.forward_intermediates(pixel_values, indices=[layer],
                                                               intermediates_only=True)
                    reference = feature_map.mean(dim=(2, 3))
            ours = _harness(backbone, class_folder, layer, pool, tmp_path)
            np.testing.assert_allclose(ours, reference.numpy(), atol=1e-5, rtol=1e-5,
                                       err_msg=f"{name} layer {layer} {pool}")


def test_timm_create_model_arguments_change_the_network_its_inputs_and_its_cache_key(class_folder, tmp_path):
    """model.kwargs reaches timm.create_model: a ViT made with img_size=64 reads 64-pixel inputs
    (timm's data config would give its pretrained 224) and equals timm's own model made so; the
    arguments are in the cache key (none: the key written before), a fine-tuned checkpoint keeps
    them, and an argument timm does not take or latentmap sets itself is one line."""
    import timm

    from latentmap.errors import ConfigError

    plain = TimmBackbone(name="test_vit", pretrained=False)
    made = TimmBackbone(name="test_vit", pretrained=False, kwargs={"img_size": 64})
    assert "kwargs" not in plain.identity() and made.identity()["kwargs"] == {"img_size": 64}
    torch.manual_seed(0)
    made.load("cpu")
    images = _folder_images(class_folder)
    pixels = made.preprocess(images)
    assert tuple(pixels.shape[1:]) == (3, 64, 64)
    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False, img_size=64).eval()
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(pixels), pre_logits=True).numpy()
    np.testing.assert_allclose(_harness(made, class_folder, -1, "embed", tmp_path / "a"), expected, atol=1e-5)
    saved = made.save(tmp_path)
    assert saved["kwargs"] == {"img_size": 64}
    reloaded = TimmBackbone(**{k: v for k, v in saved.items() if k != "_target_"})
    reloaded.load("cpu")
    np.testing.assert_allclose(_harness(reloaded, class_folder, -1, "embed", tmp_path / "b"), expected, atol=1e-5)
    cases = (({"img_sise": 64}, r"^model.kwargs.img_sise=64: timm cannot make test_vit with it \(.*unexpected keyword "
                                r"argument 'img_sise'\): see the model's class in timm"),
             ({"pretrained": True}, r"^model.kwargs.pretrained=True is set by latentmap itself: use model.pretrained$"),
             ({"in_chans": 1}, r"^model.kwargs.in_chans=1: latentmap feeds RGB images"))
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            TimmBackbone(name="test_vit", pretrained=False, kwargs=kwargs).load("cpu")


def test_timm_checkpoints_load_as_timm_writes_them_and_a_misfit_is_one_line(tmp_path):
    """model.checkpoint_path: a state dict (safetensors or torch.save), a training checkpoint's
    ``{"state_dict": ..., "epoch": ...}``, a headless one (``num_classes=0``) and one with a head for
    another number of classes (a fine-tuned model's) load the same weights; a checkpoint of another
    model, a damaged file and a pickled model are refused in one line naming the key (each was a
    traceback)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("test_vit", pretrained=False)
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "plain.safetensors"))
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "training.pth")
    headless = {k: v.contiguous() for k, v in state.items() if not k.startswith("head.")}
    save_file(headless, str(tmp_path / "headless.safetensors"))
    ten = timm.create_model("test_vit", pretrained=False, num_classes=10).state_dict()  # fine-tuned on 10 classes
    save_file({k: (ten[k] if k.startswith("head.") else v).contiguous() for k, v in state.items()},
              str(tmp_path / "ten.safetensors"))
    for name in ("plain.safetensors", "training.pth", "headless.safetensors", "ten.safetensors"):
        backbone = TimmBackbone(name="test_vit", pretrained=False, checkpoint_path=str(tmp_path / name))
        backbone.load("cpu")
        loaded = backbone._model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("head.")), name
    other = timm.create_model("test_resnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "resnet.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    torch.save(source, tmp_path / "pickled.pth")  # a whole model object: weights_only refuses it
    torch.save(list(state.values()), tmp_path / "list.pth")  # tensors, but no names
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:, :4]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "shape.safetensors"))
    unreadable = "could not be read .*: it must be a .safetensors file or a state dict"
    for name, message in (("resnet.safetensors", r"does not fit model.name='test_vit': \d+ of the model's weights "
                                                 r"are not in it \(.*\); \d+ of its keys are not the model's"),
                          ("broken.safetensors", unreadable), ("pickled.pth", unreadable),
                          ("list.pth", "holds a list that is not a state dict of tensors: save model.state_dict"),
                          ("shape.safetensors", "does not fit model.name='test_vit': size mismatch for blocks.0.attn")):
        with pytest.raises(ConfigError, match=f"model.checkpoint_path='.*{name}' {message}"):
            TimmBackbone(name="test_vit", pretrained=False, checkpoint_path=str(tmp_path / name)).load("cpu")


def test_a_failed_load_names_what_is_at_fault(tmp_path, monkeypatch):
    """The network (and the way round it for the kind of model), a local directory missing a file
    save_pretrained writes, or a name that is neither: each its own line (a local directory was
    called 'not a local directory', and timm was told to point model.name at one)."""
    from latentmap.models import base

    monkeypatch.setattr(base, "is_network_error", lambda error: isinstance(error, ConnectionError))
    offline = base.load_error("model.name", "resnet18", ConnectionError("no route"),
                              offline="set model.checkpoint_path=<file>")
    assert str(offline).endswith("unreachable. Run once with network access to fill the local cache, or set "
                                 "model.checkpoint_path=<file>")
    (tmp_path / "model").mkdir()
    local = base.load_error("model.name", str(tmp_path / "model"), OSError("Can't load image processor\nmore"))
    assert str(local) == (f"model.name='{tmp_path / 'model'}' is a local directory that could not be loaded (OSError: "
                          "Can't load image processor): it needs the files save_pretrained writes (config.json, the "
                          "weights, and the image processor's preprocessor_config.json)")
    assert "it is not a local directory and not a known model name (OSError: gone)" in str(
        base.load_error("model.name", str(tmp_path / "absent"), OSError("gone")))


def test_pixels_are_resized_flattened_pixels(class_folder, tmp_path):
    from PIL import Image

    features = _harness(PixelsBackbone(size=8), class_folder, -1, "embed", tmp_path)
    first = _folder_images(class_folder)[0].resize((8, 8), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(features[0], np.asarray(first, np.float32).reshape(-1) / 255.0, atol=1e-7)
    assert features.shape == (32, 8 * 8 * 3)


def test_one_extraction_fills_every_layer(tiny_vit, class_folder, tmp_path):
    """After one miss, every other layer and pooling is a hit without loading the model."""
    backbone = TransformersBackbone(name=str(tiny_vit))
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    assert cache.embeddings(backbone, dataset, -1, "embed", tmp_path, extraction(device="cpu")).status == "miss"
    fresh = TransformersBackbone(name=str(tiny_vit))  # a new process would start like this
    for layer in (0, 1, 2, -1):
        for pool in ("cls", "mean"):
            assert cache.embeddings(fresh, dataset, layer, pool, tmp_path, extraction(device="cpu")).status == "hit"
    assert fresh._model is None  # no weights were loaded for the hits


def test_layer_and_pool_errors_name_the_fix():
    vit = LayerInfo(num_layers=12, block_pools=("cls", "mean"))
    cnn = LayerInfo(num_layers=4, block_pools=("mean",))
    with pytest.raises(ConfigError, match=r"layer=14 is out of range for m, which has 12 blocks: use -12\.\.11 "
                                          r"\(every block, as a sweep: -m layer='range\(0,12\)'\)"):
        resolve_feature(14, "cls", vit, "m")
    with pytest.raises(ConfigError, match="pick pool=cls or pool=mean"):
        resolve_feature(3, "embed", vit, "m")
    with pytest.raises(ConfigError, match="pool=cls is not available"):
        resolve_feature(-1, "cls", cnn, "m")
    with pytest.raises(ConfigError, match="pool='max' is not a pooling"):
        resolve_feature(-1, "max", cnn, "m")
    with pytest.raises(ConfigError, match="has none: use pool=embed"):
        resolve_feature(-1, "mean", LayerInfo(0, ()), "pixels")
    assert resolve_feature(-12, "cls", vit, "m") == "layer000.cls"
    assert resolve_feature(-1, "mean", cnn, "m") == "layer003.mean"


def test_state_dict_mapping_checks_every_shape():
    target = {"a.weight": torch.zeros(3, 2), "b.bias": torch.zeros(4)}
    source = {"x": torch.ones(3, 2), "y": torch.ones(4)}
    assert list(map_state_dict_by_order(source, target)) == ["a.weight", "b.bias"]
    with pytest.raises(ValueError, match="shape mismatch"):
        map_state_dict_by_order({"y": torch.ones(4), "x": torch.ones(3, 2)}, target)
    with pytest.raises(ValueError, match="differ in length"):
        map_state_dict_by_order({"x": torch.ones(3, 2)}, target)


def test_worker_processes_give_the_same_features(tiny_resnet, class_folder):
    from latentmap.extract import extract

    backbone = TransformersBackbone(name=str(tiny_resnet))
    backbone.load("cpu")
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    serial = extract(backbone, dataset, extraction(batch_size=7, num_workers=0), progress=False)
    parallel = extract(backbone, dataset, extraction(batch_size=7, num_workers=2), progress=False)
    assert serial.keys() == parallel.keys()
    for name in serial:
        np.testing.assert_array_equal(serial[name], parallel[name])


def test_a_damaged_cache_array_is_never_read(tiny_vit, class_folder, tmp_path):
    """Same size, one byte flipped: the checksum catches it and the entry is extracted again."""
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    first = cache.embeddings(TransformersBackbone(name=str(tiny_vit)), dataset, -1, "embed", tmp_path,
                             extraction(device="cpu"))
    expected = np.array(first.values)  # a copy: first.values maps the file this test damages
    path = tmp_path / first.key / "embed.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = cache.embeddings(TransformersBackbone(name=str(tiny_vit)), dataset, -1, "embed", tmp_path,
                             extraction(device="cpu"))
    assert again.status == "miss"
    np.testing.assert_array_equal(again.values, expected)
    assert cache.embeddings(TransformersBackbone(name=str(tiny_vit)), dataset, 0, "cls", tmp_path,
                            extraction()).status == "hit"


def test_streamed_extraction_writes_the_same_arrays_batch_by_batch(tiny_vit, class_folder, tmp_path):
    """out_dir: each batch goes into a memory-mapped .npy; the files equal the in-memory result."""
    from latentmap.extract import extract

    backbone = TransformersBackbone(name=str(tiny_vit))
    backbone.load("cpu")
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    in_memory = extract(backbone, dataset, extraction(batch_size=3), progress=False)
    streamed = extract(backbone, dataset, extraction(batch_size=3), progress=False, out_dir=tmp_path)
    assert sorted(streamed) == sorted(in_memory)
    for name, values in in_memory.items():
        on_disk = np.load(tmp_path / f"{name}.npy", allow_pickle=False)
        assert on_disk.shape == values.shape and on_disk.dtype == np.float32
        np.testing.assert_array_equal(on_disk, values)


def test_mixed_precision_is_close_to_fp32_and_cached_apart(tiny_resnet, class_folder, tmp_path):
    """precision=bf16 autocasts the forward pass (on the CPU here): features near fp32's, not equal,
    and under another cache key; a bad precision is one clear line."""
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    full = cache.embeddings(TransformersBackbone(name=str(tiny_resnet)), dataset, -1, "embed", tmp_path,
                            extraction(device="cpu"))
    half = cache.embeddings(TransformersBackbone(name=str(tiny_resnet)), dataset, -1, "embed", tmp_path,
                            extraction(device="cpu", precision="bf16"))
    assert half.status == "miss" and half.key != full.key
    assert half.values.dtype == np.float32
    assert not np.array_equal(half.values, full.values)
    relative = np.linalg.norm(half.values - full.values) / np.linalg.norm(full.values)
    assert relative < 0.05, relative
    with pytest.raises(ConfigError, match=r"precision='fp8'.*fp32, bf16, fp16"):
        cache.embeddings(TransformersBackbone(name=str(tiny_resnet)), dataset, -1, "embed", tmp_path,
                         extraction(precision="fp8"))


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_clip"])
def test_preprocessing_on_the_device_gives_the_same_features(fixture, request, class_folder, tmp_path):
    """model.preprocess_on_device=true (forced here on the CPU; auto on CUDA): workers send uint8
    pixels and the torchvision-backend processor resizes and normalises in the main process.
    Every feature equals the worker-side path's, with images of one size (a stacked batch), of
    mixed sizes (a list), and in worker processes."""
    from PIL import Image

    from latentmap.extract import extract

    path = request.getfixturevalue(fixture)
    mixed = tmp_path / "mixed"
    for position, source in enumerate(sorted(p for d in class_folder.iterdir() for p in d.iterdir())):
        target = mixed / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        image = Image.open(source).convert("RGB")
        (image.resize((32 + 5 * (position % 3), 24 + 7 * (position % 2))) if position % 4 else image).save(target)
    workers = TransformersBackbone(name=str(path), preprocess_on_device=False)
    device = TransformersBackbone(name=str(path), preprocess_on_device=True)
    workers.load("cpu"), device.load("cpu")
    images = _folder_images(class_folder)
    assert device.prepare(images).dtype == torch.uint8
    assert workers.prepare(images)["pixel_values"].dtype == torch.float32
    assert isinstance(device.prepare(_folder_images(mixed)), list)
    for folder, num_workers in ((class_folder, 0), (mixed, 0), (mixed, 2)):
        dataset = data.ImageFolderSource(path=str(folder)).load(seed=0)
        expected = extract(workers, dataset, extraction(batch_size=5), progress=False)
        ours = extract(device, dataset, extraction(batch_size=5, num_workers=num_workers), progress=False)
        assert ours.keys() == expected.keys()
        for name in expected:
            np.testing.assert_allclose(ours[name], expected[name], atol=1e-5, rtol=1e-5,
                                       err_msg=f"{folder.name} {name}")


def test_preprocess_on_device_refuses_a_processor_that_cannot(tiny_vit, monkeypatch):
    """A PIL-backend processor cannot run on a device: asking for it is one clear line; auto
    (null) quietly keeps preprocessing in the workers."""
    import transformers

    load = transformers.AutoImageProcessor.from_pretrained
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained",
                        lambda *args, **kwargs: load(*args, backend="pil", **kwargs))
    with pytest.raises(ConfigError, match=r"preprocess_on_device=true, but ViTImageProcessorPil .* "
                                          r"use model.preprocess_on_device=null"):
        TransformersBackbone(name=str(tiny_vit), preprocess_on_device=True).load("cpu")
    auto = TransformersBackbone(name=str(tiny_vit))
    auto.load("cpu")
    assert auto.prepare([_blank()])["pixel_values"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"model.preprocess_on_device='yes' is not a boolean"):
        TransformersBackbone(name=str(tiny_vit), preprocess_on_device="yes").load("cpu")


def _blank():
    from PIL import Image

    return Image.new("RGB", (20, 20))


@pytest.mark.parametrize("name", ["test_vit", "test_efficientnet"])
def test_timm_preprocessing_on_the_device_gives_the_same_features(name, class_folder):
    """For timm, preprocess_on_device=true splits timm's own transform at ToTensor: resize and
    crop in the workers (uint8 out), scaling and Normalize on the device. Same features as the
    whole transform in the workers, in the main process and in worker processes."""
    from latentmap.extract import extract

    backbones = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        backbones[on_device] = TimmBackbone(name=name, pretrained=False, preprocess_on_device=on_device)
        backbones[on_device].load("cpu")
    images = _folder_images(class_folder)
    assert backbones[True].prepare(images).dtype == torch.uint8
    np.testing.assert_allclose(backbones[True]._model_input(backbones[True].prepare(images)),
                               backbones[False].preprocess(images), atol=1e-6)
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    expected = extract(backbones[False], dataset, extraction(batch_size=5), progress=False)
    for num_workers in (0, 2):
        ours = extract(backbones[True], dataset, extraction(batch_size=5, num_workers=num_workers), progress=False)
        assert ours.keys() == expected.keys()
        for feature in expected:
            np.testing.assert_allclose(ours[feature], expected[feature], atol=1e-5, rtol=1e-5, err_msg=feature)


def test_timm_preprocess_on_device_refuses_a_transform_it_cannot_split(monkeypatch):
    import timm
    from torchvision import transforms

    monkeypatch.setattr(timm.data, "create_transform",
                        lambda **config: transforms.Compose([transforms.PILToTensor(),
                                                             transforms.ConvertImageDtype(torch.float32)]))
    with pytest.raises(ConfigError, match=r"preprocess_on_device=true, but timm's transform for test_vit "
                                          r"is not .*PILToTensor"):
        TimmBackbone(name="test_vit", pretrained=False, preprocess_on_device=True).load("cpu")
    auto = TimmBackbone(name="test_vit", pretrained=False)
    auto.load("cpu")
    assert auto.prepare([_blank()]).dtype == torch.float32


def test_backbone_is_an_abstract_interface():
    from latentmap.models import Backbone

    class Incomplete(Backbone):
        FEATURE_VERSION = 1

        def identity(self):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(name="x")
    for backbone in (PixelsBackbone, TimmBackbone, TransformersBackbone):
        assert isinstance(backbone.FEATURE_VERSION, int)


def test_the_family_table_decides_how_a_model_type_is_read(tiny_vit, monkeypatch):
    """A row keyed by model_type replaces the default reading of that family, nothing else."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    from latentmap.models import FAMILIES, Family

    assert {"clip", "clip_vision_model", "mobilenet_v1", "mobilenet_v2"} <= set(FAMILIES)

    class PatchMean(Family):
        def embed(self, model, outputs, inputs, prefix, class_token):
            return outputs.last_hidden_state[:, prefix:].mean(dim=1)

    monkeypatch.setitem(FAMILIES, "vit", PatchMean())
    backbone = TransformersBackbone(name=str(tiny_vit))
    backbone.load("cpu")
    image = Image.new("RGB", (32, 32), (200, 30, 90))
    features = backbone.start_features(backbone.prepare([image]))()
    model = AutoModel.from_pretrained(tiny_vit).eval()
    with torch.no_grad():
        final = model(**AutoImageProcessor.from_pretrained(tiny_vit)(images=[image], return_tensors="pt"))
    np.testing.assert_allclose(features["embed"], final.last_hidden_state[:, 1:].mean(dim=1).numpy(), atol=1e-5)


def test_a_checkpoint_s_unused_and_missing_weights_are_one_line_each(tiny_clip, tmp_path, caplog, request):
    """transformers' LOAD REPORT table is replaced by one line each: a task head the backbone does
    not use and weights of a module ``embed`` never reads at INFO; backbone weights the checkpoint
    lacks (initialised at random) at WARNING, named."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    path = tmp_path / "vit-classifier"
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, image_size=32, patch_size=8,
                                        num_labels=3)).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)

    class Passed(logging.Handler):  # what transformers' loading logger lets through (after its filters)
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    passed = Passed()
    loader = logging.getLogger("transformers.modeling_utils")
    loader.addHandler(passed)
    request.addfinalizer(lambda: loader.removeHandler(passed))

    def loaded(name: Path) -> list[tuple[int, str]]:
        caplog.clear()
        passed.messages.clear()
        with caplog.at_level(logging.INFO, logger="latentmap.models.hf"):
            TransformersBackbone(name=str(name)).load("cpu")
        assert not any("LOAD REPORT" in m or m.startswith("Some weights of") for m in passed.messages)
        return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "latentmap.models.hf"]

    said = loaded(path)
    assert (logging.INFO, f"{path}: 2 checkpoint weights not used by the backbone (a task head or another tower): "
                          "classifier.bias, classifier.weight") in said
    assert any(level == logging.INFO and "pooler.dense.bias, pooler.dense.weight" in message  # ViTModel's pooler
               for level, message in said)
    assert not any(level >= logging.WARNING for level, _ in said), said

    weights = load_file(path / "model.safetensors")
    dropped = sorted(key for key in weights if "layer.1.output.dense" in key)  # block 1's second MLP layer
    assert len(dropped) == 2, sorted(weights)
    save_file({k: v for k, v in weights.items() if k not in dropped}, path / "model.safetensors",
              metadata={"format": "pt"})
    (warning,) = [message for level, message in loaded(path) if level == logging.WARNING]
    assert "2 backbone weights are not in the checkpoint and were initialised at random" in warning
    named = warning.rsplit(": ", 1)[1].split(", ")  # as the loaded class names them (transformers 5: layers.1.mlp.fc2)
    assert len(named) == 2 and all(".1." in name and name.endswith(("bias", "weight")) for name in named), warning

    said = loaded(tiny_clip)  # the vision tower of a two-tower checkpoint: the text side goes unused
    (unused,) = [message for _, message in said if "not used by the backbone" in message]
    assert "text_model (" in unused, unused

    # Weights whose shapes do not fit the config: transformers reports them, then raises pointing at
    # "the above report", so the report is let through, and the error is one line.
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    passed.messages.clear()
    with pytest.raises(ConfigError, match=r"^model\.name='.*vit-classifier': its weights could not be loaded into "
                                          r"the model its config describes \(.+\)$"):
        TransformersBackbone(name=str(path)).load("cpu")
    assert any("LOAD REPORT" in m or m.startswith("Some weights of") for m in passed.messages), passed.messages


def test_weight_names_are_grouped_by_module_or_by_block():
    from latentmap.models.hf import _key_groups

    assert _key_groups({"classifier.bias", "classifier.weight"}) == "classifier.bias, classifier.weight"
    unused = {f"text_model.encoder.layers.{b}.fc{i}.weight" for b in range(3) for i in range(2)} | {"logit_scale"}
    assert _key_groups(unused) == "text_model (6), logit_scale (1)"
    missing = {f"vision_model.encoder.layers.{b}.mlp.fc{i}.bias" for b in (3, 7) for i in range(3)}
    assert _key_groups(missing, by_block=True) == ("vision_model.encoder.layers.3 (3), "
                                                   "vision_model.encoder.layers.7 (3)")
