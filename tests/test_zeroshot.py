"""Zero-shot accuracy from an image-text model's text tower, held against transformers' own
``logits_per_image`` on tiny CLIP, SigLIP and SigLIP 2 checkpoints built here (no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentmap import data, zeroshot
from latentmap.extract import extract
from latentmap.models import TransformersBackbone
from latentmap.runner import run

from helpers import compose, extraction, mlflow_runs, write_class_images

CLASSES = ["blue", "green", "red", "yellow"]
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
               patch_size=8)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64,
             max_position_embeddings=16)


def _tokenizer():
    """A word-level tokenizer of the prompts' words, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[EOS]", "a", "photo", "of", "the", "small", "drawing", ".", *CLASSES]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=16)


def _checkpoint(family: str, folder: Path) -> Path:
    """A tiny random image-text checkpoint of ``family`` with its processor and tokenizer, saved as a
    hub checkpoint would be."""
    import transformers as T

    torch.manual_seed(0)
    if family == "clip":
        model = T.CLIPModel(T.CLIPConfig(text_config=_TEXT, vision_config=_VISION, projection_dim=12))
        processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    elif family == "siglip":
        model = T.SiglipModel(T.SiglipConfig(text_config=_TEXT, vision_config=_VISION))
        processor = T.SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        vision = {**_VISION, "num_patches": 16}
        vision.pop("image_size")
        model = T.Siglip2Model(T.Siglip2Config(text_config=_TEXT, vision_config=vision))
        processor = T.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    with torch.no_grad():  # logits of a readable size: a scale of 10 and, for SigLIP, a bias of -2
        model.logit_scale.fill_(float(np.log(10.0)))
        if hasattr(model, "logit_bias"):
            model.logit_bias.fill_(-2.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["clip", "siglip", "siglip2"])
def test_zero_shot_logits_equal_transformers_logits_per_image(family, tmp_path, class_folder):
    """latentmap's path (the vision tower alone through extraction, the text tower through its
    tokenizer, one template) gives the logits, argmax and probabilities of the whole model's own
    forward pass on the same images and prompts, to 1e-5."""
    import transformers as T

    path = _checkpoint(family, tmp_path / family)
    backbone = TransformersBackbone(name=str(path))
    backbone.load(device="cpu")
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    images = np.asarray(extract(backbone, dataset, extraction(batch_size=8), progress=False)["embed"])  # (N, D)
    tower = backbone.text_tower()
    assert tower is not None and tower.family.sigmoid == (family != "clip")
    assert tower.tokens(["a photo of the small blue . " * 6])["input_ids"].shape[1] <= 16  # cut at the positions
    texts = zeroshot.prompts(["a photo of a {}."], CLASSES)
    ours = zeroshot.logits(images, zeroshot.class_embeddings(tower.encode(texts), len(CLASSES)), tower.logit_scale,
                           tower.logit_bias)

    model = T.AutoModel.from_pretrained(path).eval()
    processor = T.AutoImageProcessor.from_pretrained(path)
    pictures = [record["image"].convert("RGB") for record in dataset]
    with torch.inference_mode():
        inputs = {**processor(images=pictures, return_tensors="pt"), **tower.tokens(texts)}
        theirs = model(**inputs).logits_per_image.numpy()
    assert ours.shape == theirs.shape == (len(dataset), len(CLASSES))
    np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    expected = torch.sigmoid(torch.from_numpy(theirs)) if family != "clip" else torch.softmax(
        torch.from_numpy(theirs), dim=1)
    np.testing.assert_allclose(zeroshot.probabilities(ours, tower.family.sigmoid), expected.numpy(), atol=1e-5)


def test_prompt_ensembles_average_unit_text_embeddings_per_class():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(3 * 2, 5))  # 3 classes x 2 templates, class-major
    unit = text / np.linalg.norm(text, axis=1, keepdims=True)
    mean = unit.reshape(3, 2, 5).mean(1)
    np.testing.assert_allclose(zeroshot.class_embeddings(text, 3), mean / np.linalg.norm(mean, axis=1, keepdims=True))
    assert zeroshot.prompts(["a {}.", "the {}"], ["cat", "dog"]) == ["a cat.", "the cat", "a dog.", "the dog"]
    # a folder name's underscores read as spaces, as CLIP's ImageNet prompts write class names
    assert zeroshot.prompts(["a photo of a {}."], ["golden_retriever"]) == ["a photo of a golden retriever."]


def test_zero_shot_scores_and_per_class_rows_equal_their_definitions():
    """Accuracy and balanced accuracy from the logits' argmax; per-class recall with its exact
    binomial interval; the half-sample intervals hold the values."""
    from latentmap import resampling, stats

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], [30, 20, 10])
    classes = np.eye(3)
    images = classes[labels] + rng.normal(scale=0.8, size=(60, 3))
    halves = resampling.halves(labels, 60, 20, 0)
    found = zeroshot.evaluate(images, labels, ["a", "b", "c"], ["{}"], classes, 100.0, None, halves.members,
                              halves.scale, 0.95)
    predicted = images.argmax(1)
    assert (found.predicted == predicted).all()
    assert found.scores["zeroshot_acc"].value == pytest.approx((predicted == labels).mean())
    recalls = [(predicted[labels == c] == c).mean() for c in range(3)]
    assert found.scores["zeroshot_balanced_acc"].value == pytest.approx(np.mean(recalls))
    for name, ci in found.scores.items():
        assert ci.lo <= ci.value <= ci.hi, name
    np.testing.assert_allclose(found.per_class["recall"], recalls)
    lo, hi = stats.clopper_pearson(int(recalls[2] * 10), 10, 0.95)
    assert found.per_class.loc[2, "lo"] == pytest.approx(lo) and found.per_class.loc[2, "hi"] == pytest.approx(hi)
    assert list(found.prompts["prompt"]) == ["a", "b", "c"]


def test_a_run_of_an_image_text_model_logs_zero_shot_and_caches_its_text(tmp_path, monkeypatch):
    """run.py on a tiny SigLIP: zeroshot_acc and zeroshot_balanced_acc with bounds, the per-class
    table and the prompts logged, the class prompts placed in the map (and drawn in map.html), the
    text embeddings cached (a second run, of another layer, reads them and scores the same)."""
    images = tmp_path / "images"
    write_class_images(images, n_per_class=10)
    path = _checkpoint("siglip", tmp_path / "siglip")
    common = ["model=hf", f"model.name={path}", "dataset=imagefolder", f"dataset.path={images}", "reducer=pca",
              "metrics.probe=false", "metrics.bootstrap=10", "metrics.k=3",
              "audit.enabled=false", f"cache_dir={tmp_path / 'cache'}"]
    out = tmp_path / "out"
    scores = run(compose([*common, "zeroshot.templates=['a photo of a {}.','a drawing of a {}.']",
                          "plots.map_thumbnails=20"], out))
    assert 0 <= scores["zeroshot_acc"] <= 1 and 0 <= scores["zeroshot_balanced_acc"] <= 1
    client, (logged,) = mlflow_runs(out)
    assert {"zeroshot_acc_lo", "zeroshot_acc_hi"} <= set(logged.data.metrics)  # (a random model: maybe no spread)
    assert logged.data.tags["zeroshot_text_cache"] == "miss" and logged.data.tags["zeroshot_prompts"] == "8"
    folder = Path(client.download_artifacts(logged.info.run_id, "tables"))
    import pandas as pd

    prompts = pd.read_csv(folder / "zeroshot_prompts.csv")
    assert list(prompts["prompt"][:2]) == ["a photo of a blue.", "a drawing of a blue."]
    assert set(pd.read_csv(folder / "zeroshot_per_class.csv")["class"]) == set(CLASSES)
    # The class prompts placed in the PCA map: the fitted PCA's transform of their unit class embeddings.
    from sklearn.decomposition import PCA

    embeddings = np.load(Path(client.download_artifacts(logged.info.run_id, "arrays")) / "embeddings.npy")
    space = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    backbone = TransformersBackbone(name=str(path))
    backbone.load(device="cpu")
    tower = backbone.text_tower()
    classes = zeroshot.class_embeddings(tower.encode(list(prompts["prompt"])), len(CLASSES))
    expected = PCA(2, random_state=42).fit(space).transform(classes.astype(np.float32))
    placed = pd.read_csv(folder / "zeroshot_text_coords.csv")
    assert list(placed["class"]) == CLASSES
    np.testing.assert_allclose(placed[["x", "y"]].to_numpy(), expected, atol=1e-4)
    page = Path(client.download_artifacts(logged.info.run_id, "map.html")).read_text()
    assert "class prompts (text)" in page
    # a cache hit reads the text embeddings, scale and bias without loading the text tower
    monkeypatch.setattr(TransformersBackbone, "text_tower", lambda self: pytest.fail("text tower loaded on a hit"))
    run(compose([*common, "zeroshot.templates=['a photo of a {}.','a drawing of a {}.']", "layer=0", "pool=mean",
                 "plots.enabled=false"], out))
    second = next(r for r in mlflow_runs(out)[1] if r.info.run_id != logged.info.run_id)
    assert second.data.tags["zeroshot_text_cache"] == "hit"
    assert second.data.metrics["zeroshot_acc"] == pytest.approx(scores["zeroshot_acc"])  # the joint space either way
    # compare.html of the two runs draws the first run's class prompts at their places in its map
    import json
    import re

    from latentmap import linked

    page = linked.for_runs(client, [logged.info.run_id, second.info.run_id], f"sqlite:///{out}/mlflow.db", 0.95)
    sides = json.loads(re.search(r'id="lm-data">(.*?)</script>', page, re.S)[1].replace("<\\/", "</"))["sides"]
    assert [t[0] for t in sides[0]["texts"]] == CLASSES and sides[1]["texts"] == []
    np.testing.assert_allclose([t[1:] for t in sides[0]["texts"]], placed[["x", "y"]].to_numpy(), rtol=1e-6)


def test_image_only_models_skip_zero_shot_in_one_line(tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="latentmap.runner")
    scores = run(compose(["model=pixels", "model.size=8", "dataset.limit=60", "reducer=pca", "plots.enabled=false",
                          "metrics.probe=false", "metrics.bootstrap=0", "audit.enabled=false"], tmp_path))
    assert "zeroshot_acc" not in scores
    lines = [r.getMessage() for r in caplog.records if "zero-shot" in r.getMessage()]
    assert lines == ["zero-shot: skipped, pixels has no text tower (an image-only model)"], lines


def test_a_checkpoint_without_its_tokenizer_skips_zero_shot_and_the_run_finishes(tmp_path, caplog):
    """An image-text checkpoint saved without a tokenizer: one warning, no zero-shot, a FINISHED run."""
    import logging

    images = tmp_path / "images"
    write_class_images(images, n_per_class=6)
    path = _checkpoint("clip", tmp_path / "clip")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)  # (transformers would still make an empty CLIP tokenizer)
    caplog.set_level(logging.INFO)
    scores = run(compose(["model=hf", f"model.name={path}", "dataset=imagefolder", f"dataset.path={images}",
                          "reducer=pca", "plots.enabled=false", "metrics.probe=false", "metrics.bootstrap=0",
                          "metrics.k=3", "audit.enabled=false"], tmp_path / "out"))
    assert "zeroshot_acc" not in scores and "knn_acc_hd" in scores
    assert any("has a text tower but no tokenizer" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    # the skip does not contradict the warning (it said "has no text tower (an image-only model)")
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("zero-shot: skipped")]
    assert skipped == [f"zero-shot: skipped, {path}'s text tower cannot be used (the warning above says why)"], \
        skipped
    assert mlflow_runs(tmp_path / "out")[1][0].info.status == "FINISHED"


def test_zero_shot_intervals_cover_the_population_values_on_repeated_draws():
    """A fixed zero-shot classifier on 200 draws of 300 images from a known five-class mixture (classes
    of unequal size and difficulty): the 95% half-sample intervals of zeroshot_acc and
    zeroshot_balanced_acc cover the population values (from 2,000,000 images) at least 90% of the
    time. (At 400 draws: 0.965 and 0.948.)"""
    from latentmap import resampling

    n_classes, width = 5, 8
    classes = np.eye(n_classes, width)
    weights, noise = np.array([0.4, 0.25, 0.15, 0.12, 0.08]), np.array([0.5, 0.8, 1.0, 1.2, 1.5])

    def draw(n, rng):
        labels = rng.choice(n_classes, n, p=weights)
        return classes[labels] + rng.normal(size=(n, width)) * noise[labels][:, None], labels

    population, truth = draw(2_000_000, np.random.default_rng(99))
    predicted = (population @ classes.T / np.linalg.norm(population, axis=1, keepdims=True)).argmax(1)
    values = {"zeroshot_acc": (predicted == truth).mean(),
              "zeroshot_balanced_acc": np.mean([(predicted[truth == c] == c).mean() for c in range(n_classes)])}
    rng, covered = np.random.default_rng(0), dict.fromkeys(values, 0)
    for draw_index in range(200):
        images, labels = draw(300, rng)
        halves = resampling.halves(labels, 300, 30, draw_index)
        found = zeroshot.evaluate(images, labels, [str(c) for c in range(n_classes)], ["{}"], classes, 100.0, None,
                                  halves.members, halves.scale, 0.95)
        for name, value in values.items():
            covered[name] += found.scores[name].lo <= value <= found.scores[name].hi
    assert all(count / 200 >= 0.90 for count in covered.values()), covered
