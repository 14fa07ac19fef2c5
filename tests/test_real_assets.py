"""Real weights and real images: the default model is right, and models beat the pixels baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentmap.models import EfficientNetLite0
from latentmap.runner import run

from helpers import SHARED, compose, extraction, requires_shared


def _imagenet_top(backbone, images, k: int = 3) -> list[list[str]]:
    import timm

    info = timm.data.ImageNetInfo()
    with torch.inference_mode():
        logits = backbone._model(backbone.preprocess(images))
    return [[info.index_to_description(int(i)).split(",")[0] for i in row] for row in logits.topk(k).indices]


def test_efficientnet_lite0_weights_classify_real_photographs():
    """scikit-learn's two photographs: a Chinese temple and a flower."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    backbone = EfficientNetLite0()
    backbone.load("cpu")
    china, flower = _imagenet_top(backbone, [Image.fromarray(a) for a in load_sample_images().images])
    assert "palace" in china or "monastery" in china, china
    assert "daisy" in flower, flower
    # The same architecture with random weights does not: the mapping carries the knowledge.
    import timm

    random = EfficientNetLite0()
    random._model, random._transform = timm.create_model("tf_efficientnet_lite0").eval(), backbone._transform
    assert _imagenet_top(random, [Image.fromarray(a) for a in load_sample_images().images])[0][0] != "palace"


@requires_shared("data", "cifar10-test")
def test_efficientnet_lite0_sees_dogs_as_dogs():
    from PIL import Image

    paths = sorted((SHARED / "data" / "cifar10-test" / "dog").glob("*.jpg"))[:20]
    backbone = EfficientNetLite0()
    backbone.load("cpu")
    with torch.inference_mode():
        top1 = backbone._model(backbone.preprocess([Image.open(p).convert("RGB") for p in paths])).argmax(1)
    canine = ((top1 >= 151) & (top1 <= 275)).float().mean().item()  # ImageNet's dogs, wolves and foxes
    assert canine >= 0.5, canine


@requires_shared("models", "mobilenet_v2_1.0_224")
@requires_shared("data", "cifar10-test")
def test_mobilenet_v2_beats_pixels_on_cifar10(tmp_path):
    common = ["dataset=imagefolder", f"dataset.path={SHARED / 'data' / 'cifar10-test'}", "dataset.limit=300",
              "reducer=pca", "plots.enabled=false", "metrics.probe=false", "tracking=none"]
    model = run(compose(common + ["model=hf", f"model.name={SHARED / 'models' / 'mobilenet_v2_1.0_224'}"], tmp_path))
    pixels = run(compose(common + ["model=pixels"], tmp_path))
    assert pixels["knn_acc_hd"] > 0.15  # the baseline itself is above chance (0.1)
    assert model["knn_acc_hd"] > pixels["knn_acc_hd"] + 0.25, (model, pixels)
    assert model["silhouette_hd"] > pixels["silhouette_hd"]


@requires_shared("models", "mobilenet_v2_1.0_224")
def test_mobilenet_v2_blocks_are_hidden_states_without_offset(class_folder, tmp_path):
    """MobileNetV2's hidden_states hold block outputs only: block 0 is hidden_states[0]."""
    from transformers import AutoImageProcessor, AutoModel

    from latentmap import cache, data
    from latentmap.models import TransformersBackbone

    path = SHARED / "models" / "mobilenet_v2_1.0_224"
    dataset = data.ImageFolderSource(path=str(class_folder), limit=8).load(seed=0)
    backbone = TransformersBackbone(name=str(path))
    assert backbone.load("cpu").num_layers == 16
    ours = cache.embeddings(backbone, dataset, 0, "mean", tmp_path, extraction(device="cpu")).values
    images = [data.decode_rgb(r, i, data.PIL_MAX_IMAGE_PIXELS)
              for r, i in zip(data.undecoded(dataset)["image"], dataset["index"])]
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        pixel_values = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")["pixel_values"]
        out = model(pixel_values=pixel_values, output_hidden_states=True)
    np.testing.assert_allclose(ours, out.hidden_states[0].mean(dim=(2, 3)).numpy(), atol=1e-5)
    embed = cache.embeddings(backbone, dataset, -1, "embed", tmp_path, extraction(device="cpu")).values
    # The classifier's input. 17 blocks deep, channels-last convolutions sum in another order than
    # the reference's contiguous ones: up to 2.4e-5 apart on values near 4 (relative 1.9e-5).
    np.testing.assert_allclose(embed, out.pooler_output.numpy(), rtol=5e-5, atol=1e-5)


@pytest.mark.slow
@requires_shared("models", "mobilenet_v2_1.0_224")
@requires_shared("data", "cifar10-test")
def test_mobilenet_v2_finetuned_on_cifar10_improves_on_heldout(tmp_path):
    """About 2.5 minutes here: 500 CIFAR-10 test images train 2 epochs, the other 500 are studied."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from latentmap.finetune import finetune
    from latentmap.finetune_study import study

    from helpers import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("finetune", overrides=[
            f"output_dir={tmp_path}", "model=hf", f"model.name={SHARED / 'models' / 'mobilenet_v2_1.0_224'}",
            "dataset=imagefolder", f"dataset.path={SHARED / 'data' / 'cifar10-test'}", "dataset.limit=1000",
            "dataset.holdout=0.5", "epochs=2", "batch_size=32", "optimizer.lr=1e-4", "name=mnv2", "tracking=none"])
    assert finetune(cfg)["heldout_acc"] > 0.3  # chance is 0.1
    scores = study(compose(["experiment=finetune_study", f"finetuned={tmp_path / 'checkpoints' / 'mnv2'}",
                            "reducer=pca", "tracking=none"], tmp_path))
    assert scores["knn_acc_hd_finetuned"] > scores["knn_acc_hd_base"]
    assert scores["cka_first_block"] > scores["cka_last_block"]
