"""CUDA extraction against the CPU path (marker ``gpu``: deselected by default, since this machine
has no GPU; run with ``python -m pytest -m gpu`` where one is present).

On CUDA the harness finishes preprocessing on the GPU (a transformers processor resizes and
normalises there; a timm transform normalises there), queues each batch before collecting the
previous one, and brings the features back through one asynchronous copy. These tests check that
none of that changes what comes out beyond float rounding and, for GPU resizing, one uint8 level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentmap import data
from latentmap.extract import extract
from latentmap.models import TransformersBackbone

from helpers import extraction, write_class_images

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def upscaling_vit(tmp_path_factory) -> Path:
    """A random ViT on 48x48 inputs, so 32x32 images are really resized by the processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit48")
    config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=128, image_size=48, patch_size=8)
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_class_images(root, n_per_class=9)
    return data.ImageFolderSource(path=str(root)).load(seed=0)


def _extract(path, images, device, precision="fp32", on_device=None, **kwargs):
    backbone = TransformersBackbone(name=str(path), preprocess_on_device=on_device)
    backbone.load(device, precision)
    return backbone, extract(backbone, images, extraction(batch_size=5, **kwargs), progress=False)


def test_cuda_extraction_equals_the_cpu_path(upscaling_vit, images, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (this test runs with -m gpu on a GPU machine)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _, cpu = _extract(upscaling_vit, images, "cpu", on_device=False)
    backbone, gpu = _extract(upscaling_vit, images, "cuda", num_workers=2, out_dir=tmp_path)
    batch = backbone.prepare([_blank_image()])
    assert batch.dtype == torch.uint8  # auto: preprocessing on the GPU
    _, gpu_workers = _extract(upscaling_vit, images, "cuda", on_device=False)
    assert cpu.keys() == gpu.keys() == gpu_workers.keys()
    for name in cpu:  # same pixels, fp32 model on another device: float rounding only
        np.testing.assert_allclose(gpu_workers[name], cpu[name], atol=1e-4, rtol=1e-4, err_msg=name)
        relative = np.linalg.norm(gpu[name] - cpu[name]) / np.linalg.norm(cpu[name])
        assert relative < 1e-2, (name, relative)
    _, half = _extract(upscaling_vit, images, "cuda", precision="bf16")
    relative = np.linalg.norm(half["embed"] - cpu["embed"]) / np.linalg.norm(cpu["embed"])
    assert 0 < relative < 0.05, relative


def test_gpu_resizing_differs_from_the_cpu_by_at_most_one_level(upscaling_vit, images):
    """The processor resizing uint8 pixels on CUDA against the same processor on the CPU: a pixel
    may round to the neighbouring uint8 level, never further."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (this test runs with -m gpu on a GPU machine)")
    from latentmap.models import uint8_pixels

    backbone = TransformersBackbone(name=str(upscaling_vit))
    backbone.load("cuda")
    processor = backbone._processor
    pixels = uint8_pixels([data.decode_rgb(row["image"], row["index"], data.PIL_MAX_IMAGE_PIXELS)
                           for row in data.undecoded(images)])
    on_cpu = processor(images=pixels, return_tensors="pt", device="cpu")["pixel_values"]
    on_gpu = processor(images=pixels.cuda(), return_tensors="pt", device="cuda")["pixel_values"].cpu()
    one_level = max(processor.rescale_factor / std for std in processor.image_std)
    difference = (on_gpu - on_cpu).abs()
    share = float((difference > 1e-6).float().mean())
    print(f"GPU vs CPU resize: max {float(difference.max()) / one_level:.3f} levels, {share:.2%} of values differ")
    assert float(difference.max()) <= one_level + 1e-5


def test_timm_cuda_extraction_equals_the_cpu_path(images):
    """timm on CUDA: resize and crop in the workers, scaling and Normalize on the GPU; the pixels
    are the CPU's, so fp32 features agree to float rounding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (this test runs with -m gpu on a GPU machine)")
    from latentmap.models import TimmBackbone

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        backbone = TimmBackbone(name="test_efficientnet", pretrained=False)
        backbone.load(device)
        assert backbone.prepare([_blank_image()]).dtype == (torch.uint8 if device == "cuda" else torch.float32)
        results[device] = extract(backbone, images, extraction(batch_size=5, num_workers=2), progress=False)
    assert results["cpu"].keys() == results["cuda"].keys()
    for name, expected in results["cpu"].items():
        np.testing.assert_allclose(results["cuda"][name], expected, atol=1e-4, rtol=1e-4, err_msg=name)


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (32, 32))
