"""Fine-tuning (finetune.py) on tiny models and learnable synthetic classes, and the study of the
checkpoint it writes (finetune_study.py: its checks and alignment are also in test_finetune_study.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from re import search as find_pattern
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentmap import cache, data
from latentmap.finetune import finetune, freeze_first_blocks
from latentmap.finetune_study import study
from latentmap.models import TimmBackbone, TransformersBackbone
from latentmap.runner import run

from helpers import (
    CONF,
    assert_one_job_failed,
    compose,
    extraction,
    mlflow_runs,
    run_script,
    sweep_runs,
    write_class_images,
)

TINY = "tiny-epochs-3"  # name=tiny in the sweep over epochs=0,3: the job that trains ends with what it varies


def _compose_finetune(overrides, output_dir):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("finetune", overrides=[f"output_dir={output_dir}", *overrides])


@pytest.fixture(scope="module")
def finetuned(tiny_vit, tmp_path_factory):
    """``python scripts/finetune.py -m epochs=0,3`` (in this process): job #0 is a user error (no
    epochs), job #1 fine-tunes a tiny ViT 3 epochs on 64 images of 4 classes (30% held out). The
    sweep goes on past the failure."""
    root = tmp_path_factory.mktemp("finetune")
    write_class_images(root / "images", n_per_class=16, seed=5)
    code, output = run_script(["scripts/finetune.py", "-m", f"output_dir={root}", "model=hf", f"model.name={tiny_vit}",
                               "dataset=imagefolder", f"dataset.path={root / 'images'}", "epochs=0,3", "batch_size=8",
                               "optimizer.lr=1e-3", "name=tiny"], root)
    return root, SimpleNamespace(returncode=code, stderr=output, stdout="")


def test_a_finetuning_sweep_goes_on_past_a_failing_job(finetuned):
    root, result = finetuned
    assert_one_job_failed(result, "epochs=0 must be a positive integer")
    _, runs = mlflow_runs(root)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    # epochs=0 is caught before any work: its run is FAILED with the error and nothing else; the
    # other job's run is named for what it is.
    by_epochs = {c.data.params["epochs"]: c for c in children}
    assert {e: c.info.status for e, c in by_epochs.items()} == {"0": "FAILED", "3": "FINISHED"}
    assert by_epochs["0"].data.tags["error"] == "ConfigError: epochs=0 must be a positive integer (e.g. epochs=3)"
    assert by_epochs["0"].data.tags["latentmap.refused"] == "true" and not by_epochs["0"].data.metrics
    trained = by_epochs["3"]
    assert trained.info.run_name == f"finetune {Path(trained.data.params['model.name']).name} · 3 epochs"
    # Both are fine-tuning runs, the refused one too: report.py and compare.py read them as mapping
    # runs without the tag (a blank row of the summary; "made by an older latentmap" in compare.py).
    assert {c.data.tags.get("latentmap.role") for c in children} == {"finetune"}
    from latentmap.logged import not_a_mapping_run

    client, _ = mlflow_runs(root)
    assert not_a_mapping_run(client, trained.info.run_id).startswith(
        f"run {trained.info.run_id} is a fine-tuning run (finetune.py), not a mapping run")
    from latentmap.commands import report

    with pytest.raises(SystemExit, match=r"selects no mapping runs, only finetune runs: report.py summarises runs of "
                                         r"run.py"):  # it said the sweep had no child runs
        report.main([parents[0].info.run_id, "--tracking-uri", f"sqlite:///{root}/mlflow.db"])


def test_finetuning_learns_and_logs_every_epoch(finetuned):
    root, _ = finetuned
    client, runs = mlflow_runs(root)
    (logged,) = [r for r in runs if r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags]
    history = {m: [p.value for p in client.get_metric_history(logged.info.run_id, m)]
               for m in ("train_loss", "train_acc", "heldout_acc")}
    assert len(history["train_loss"]) == 3 and len(history["heldout_acc"]) == 4  # step 0 = before training
    assert history["heldout_acc"][-1] > 0.5  # chance is 0.25
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert logged.data.metrics["heldout_acc"] == history["heldout_acc"][-1]
    assert logged.data.tags["checkpoint"] == str((root / "checkpoints" / TINY).resolve())


def test_checkpoint_reloads_through_model_hf_and_differs_from_base(finetuned, tiny_vit):
    root, _ = finetuned
    checkpoint = root / "checkpoints" / TINY
    record = json.loads((checkpoint / "latentmap.json").read_text())
    assert record["reload"]["name"] == str(checkpoint.resolve())
    assert record["base_model"]["name"] == str(tiny_vit)
    heldout = data.ImageFolderSource(path=str(root / "images"), holdout=0.3, part="holdout").load(seed=42)
    train = data.ImageFolderSource(path=str(root / "images"), holdout=0.3, part="train").load(seed=42)
    assert not set(heldout["index"]) & set(train["index"]) and len(heldout) + len(train) == 64
    tuned = cache.embeddings(TransformersBackbone(name=str(checkpoint)), heldout, -1, "embed", root / "c",
                             extraction()).values
    base = cache.embeddings(TransformersBackbone(name=str(tiny_vit)), heldout, -1, "embed", root / "c",
                            extraction()).values
    assert tuned.shape == base.shape and not np.allclose(tuned, base, atol=1e-3)
    scores = run(compose(["model=hf", f"model.name={checkpoint}", "dataset=imagefolder",
                          f"dataset.path={root / 'images'}", "reducer=pca", "metrics.k=5",
                          "plots.enabled=false", "metrics.probe=false", "tracking=none"], root / "run"))
    assert scores["knn_acc_hd"] > 0.9


@pytest.fixture(scope="module")
def studied(finetuned):
    """The fine-tuning study of ``finetuned``'s checkpoint against its base (in this process): its
    config, returned scores and output folder."""
    root, _ = finetuned
    out = root / "study"
    cfg = compose(["experiment=finetune_study", f"finetuned={root / 'checkpoints' / TINY}", "reducer=pca",
                   "metrics.k=3", "study.permutations=50", "study.bootstrap=20"], out)
    return cfg, study(cfg), out


def test_finetune_study_compares_on_heldout_images(finetuned, studied):
    root, _ = finetuned
    cfg, scores, out = studied
    client, (logged,) = mlflow_runs(out)
    assert logged.info.status == "FINISHED"
    cka = [p.value for p in client.get_metric_history(logged.info.run_id, "cka_base_finetuned")]
    assert len(cka) == 3 and all(0 <= v <= 1 + 1e-9 for v in cka)
    artifacts = Path(client.download_artifacts(logged.info.run_id, ""))
    indices = np.load(artifacts / "arrays/indices.npy")
    heldout = data.ImageFolderSource(path=str(root / "images"), holdout=0.3, part="holdout").load(seed=42)
    np.testing.assert_array_equal(indices, heldout["index"])  # exactly the held-out images
    for name in ("finetune_depth", "finetune_maps", "neighbourhood_change", "most_changed"):
        assert (artifacts / "plots" / f"{name}.png").is_file()
    base = np.load(artifacts / "arrays/coords_pca_base.npy")
    aligned = np.load(artifacts / "arrays/coords_pca_finetuned_aligned.npy")
    raw = np.load(artifacts / "arrays/coords_pca_finetuned.npy")
    assert np.sum((aligned - base) ** 2) <= np.sum((raw - base) ** 2) + 1e-6
    assert np.load(artifacts / "arrays/coords_aligned_umap_base.npy").shape == base.shape
    assert np.load(artifacts / "arrays/coords_aligned_umap_finetuned.npy").shape == base.shape
    assert set(scores) >= {"knn_acc_hd_base", "knn_acc_hd_finetuned", "cka_first_block", "cka_last_block",
                           "knn_overlap_last_block"}
    # Per block: the paired difference of each metric is that of the metric's reference on the cached
    # blocks, its interval the paired half-sample one (stats.paired_halves on the same halves); the
    # p-values are adjusted by Benjamini-Hochberg over every block x metric; the neighbourhood overlap
    # is mutual k-NN of those blocks.
    import pandas as pd

    from latentmap import cache, measures, metrics, resampling, stats

    table = pd.read_csv(artifacts / "tables/per_layer.csv")
    overlap = np.load(artifacts / "arrays/knn_overlap.npy")
    # Per class at the final block: the classes partition the images, so the size-weighted mean of the
    # classes' differences is the block's difference; Holm's adjustment over the table.
    by_class = pd.read_csv(artifacts / "tables/per_class_differences.csv")
    knn = by_class[by_class["metric"] == "knn_acc_hd"]
    assert sorted(knn["class"]) == sorted(data.class_names(heldout)) and len(by_class) == 2 * len(knn)
    assert (knn["difference"] * knn["n"]).sum() / knn["n"].sum() == pytest.approx(
        table["delta_knn_acc_hd"].iloc[-1], abs=1e-9)
    assert (by_class["p_holm"] >= by_class["p_value"] - 1e-12).all() and by_class["p_holm"].le(1).all()
    labels = np.load(artifacts / "arrays/labels.npy")
    # compare.html: fine-tuned (A) and base (B) on their aligned maps, the final block's numbers beside
    page = (artifacts / "compare.html").read_text()
    assert "A: fine-tuned" in page and "B: base" in page and "(aligned UMAP)" in page
    for metric in ("knn_acc_hd", "silhouette_hd"):
        shown = find_pattern(rf'<tr data-metric="{metric}">(?:<td[^>]*>[^<]*</td>){{3}}<td data-value="([^"]+)"', page)
        assert float(shown[1]) == pytest.approx(table[f"delta_{metric}"].iloc[-1], abs=1e-12)
    keys = {side: logged.data.tags[f"cache_key_{side}"] for side in ("base", "finetuned")}
    blocks = {side: cache.block_features(out / "cache", key, "mean") for side, key in keys.items()}
    assert overlap.shape == (len(blocks["base"]), len(labels))
    for metric in ("knn_acc_hd", "silhouette_hd", "knn_acc_weighted", "probe_acc", "probe_balanced_acc"):
        assert {f"delta_{metric}", f"delta_{metric}_lo", f"delta_{metric}_hi", f"delta_{metric}_p"} <= set(table)
    for index, (base_block, tuned_block) in enumerate(zip(blocks["base"], blocks["finetuned"])):
        ours = metrics.knn_accuracy(tuned_block, labels, 3, 5, "cosine", 42)
        theirs = metrics.knn_accuracy(base_block, labels, 3, 5, "cosine", 42)
        halves = resampling.halves(labels, len(labels), int(cfg.metrics.bootstrap), 42)
        sides = [resampling.evaluate(block, None, labels, halves, k=3, folds=5, seed=42, distance="cosine", probe=False)
                 for block in (tuned_block, base_block)]
        found = stats.paired_halves(ours, theirs, sides[0].resampled["knn_acc_hd"], sides[1].resampled["knn_acc_hd"],
                                    halves.scale, len(labels))
        row = table.iloc[index]
        assert row["delta_knn_acc_hd"] == pytest.approx(ours - theirs, abs=1e-12)
        assert (row["delta_knn_acc_hd_lo"], row["delta_knn_acc_hd_p"]) == pytest.approx((found.lo, found.p_value))
        np.testing.assert_allclose(overlap[index], measures.mutual_knn_per_image(base_block, tuned_block, 3), atol=1e-6)
        assert 1 / 51 <= row["cka_debiased_p"] <= 1 and row["cka_debiased"] == pytest.approx(
            measures.debiased_cka(base_block, tuned_block), abs=1e-9)
    deltas = [c for c in table if c.startswith("delta_") and c.endswith("_p")]
    adjusted = stats.adjust(table[deltas].to_numpy().ravel(), "bh").reshape(len(table), len(deltas))
    np.testing.assert_allclose(table[[f"{c}_adj" for c in deltas]].to_numpy(), adjusted)
    # report.html: every figure embedded, each per-block cell the value of per_layer.csv, nothing fetched.
    page = (artifacts / "report.html").read_text()
    for name in ("finetune_depth", "finetune_maps", "neighbourhood_change", "most_changed"):
        assert re.search(rf'<img alt="{name}" src="data:image/png;base64,', page), name
    cells = re.findall(r'data-block="(\d+)" data-column="(\w+)" data-value="([^"]+)"', page)
    assert {column for _, column, _ in cells} >= {"delta_knn_acc_hd", "delta_silhouette_hd", "cka_debiased", "rsa"}
    by_block = table.set_index("layer_index")
    for block, column, value in cells:
        assert float(value) == by_block.loc[int(block), column], (block, column)
    assert "http" not in page.split("<body>")[1] and "<script" not in page


def test_the_finetune_study_page_in_a_real_browser(studied):
    """The fine-tuning study's page in Chromium at 1,000 and 1,400 px: every figure drawn, nothing
    wider than the window, and each per-block table whole in it, every value over its p-values."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    from test_look import _chromium

    client, (logged,) = mlflow_runs(studied[2])
    report = Path(client.download_artifacts(logged.info.run_id, "report.html"))

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        for width in (1000, 1400):
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(report.as_uri())
            seen = page.evaluate("""() => ({
                page: document.documentElement.scrollWidth,
                figures: Array.from(document.querySelectorAll('figure img'), (img) => img.complete && img.naturalWidth > 100),
                tables: Array.from(document.querySelectorAll('table.blocks'), (t) => [t.scrollWidth, t.clientWidth,
                    Array.from(t.querySelectorAll('td[data-column]'), (td) => td.querySelector('.p')?.textContent)])})""")  # noqa: E501 - JavaScript source
            assert seen["page"] <= width and len(seen["figures"]) == 4 and all(seen["figures"]), (width, seen)
            assert len(seen["tables"]) == 2, seen
            for scrolled, shown, p_lines in seen["tables"]:
                assert scrolled <= shown and p_lines, (width, seen)
                assert all(re.fullmatch(r"p \S+ · BH \S+", line or "") for line in p_lines), (width, p_lines)
        browser.close()


def test_frozen_layers_do_not_move(tiny_vit, tmp_path):
    root = tmp_path
    write_class_images(root / "images", n_per_class=6, seed=1)
    cfg = _compose_finetune(["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder",
                             f"dataset.path={root / 'images'}", "epochs=1", "batch_size=6", "optimizer.lr=1e-2",
                             "frozen_layers=2", "name=frozen", "tracking=none"], root)
    finetune(cfg)
    from transformers import AutoModel

    before = AutoModel.from_pretrained(tiny_vit).state_dict()
    after = AutoModel.from_pretrained(root / "checkpoints" / "frozen").state_dict()
    for name in before:
        if name.startswith("pooler"):
            continue
        same = torch.equal(before[name], after[name])
        if name.startswith(("embeddings", "encoder.layer.0.", "encoder.layer.1.")):
            assert same, name
        elif name.startswith("encoder.layer.2.") and name.endswith("weight"):
            assert not same, name


def test_freezing_a_model_without_numbered_blocks_is_a_clear_error():
    from latentmap.errors import ConfigError

    with pytest.raises(ConfigError, match="has no numbered blocks"):
        freeze_first_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1, "mlp")


def test_timm_resnet_stages_freeze_from_the_stem_and_a_count_above_the_blocks_is_refused():
    """timm names a ResNet's stages layer1 .. layer4 (no dot before the number): they are its 4
    blocks, so frozen_layers=2 freezes the stem, layer1 and layer2 (it said the model had no
    numbered blocks). More than the blocks there are is one line (it froze everything silently)."""
    import timm

    from latentmap.errors import ConfigError

    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    freeze_first_blocks(model, 2, "resnet18")
    learning = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1", "layer2"} and learning == {"layer3", "layer4"}
    with pytest.raises(ConfigError, match=r"^frozen_layers=5 is more than the 4 blocks of resnet18: use 0\.\.4"):
        freeze_first_blocks(timm.create_model("resnet18", pretrained=False), 5, "resnet18")


def test_timm_checkpoint_round_trip(class_folder, tmp_path):
    torch.manual_seed(0)
    backbone = TimmBackbone(name="test_vit", pretrained=False)
    backbone.load("cpu")
    reload = backbone.save(tmp_path)
    assert Path(reload["checkpoint_path"]).suffix == ".safetensors"
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    original = cache.embeddings(backbone, dataset, -1, "embed", tmp_path / "a", extraction()).values
    from hydra.utils import instantiate

    reloaded = cache.embeddings(instantiate(reload), dataset, -1, "embed", tmp_path / "b", extraction()).values
    np.testing.assert_allclose(reloaded, original, atol=1e-6)



def test_fine_tuning_the_pixels_baseline_is_refused_in_one_line(tmp_path, class_folder, tiny_vit):
    """model=pixels has no weights: scripts/finetune.py refuses it before any work, naming the model
    and what to choose, instead of failing inside the training loop. Its batches still reach
    _forward as torch tensors through embed_with_grad (the path fine-tuning uses), equal to its
    extracted features."""
    import torch

    from latentmap import data
    from latentmap.errors import ConfigError
    from latentmap.finetune import _prepare_finetune
    from latentmap.models import PixelsBackbone

    cfg = _compose_finetune(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^model=pixels: .*PixelsBackbone has no weights to fine-tune; choose"):
        _prepare_finetune(cfg)
    trainable = _compose_finetune(["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder",
                                   f"dataset.path={class_folder}"], tmp_path)
    assert len(_prepare_finetune(trainable)[2]) == 4  # a network passes the check (4 classes)
    backbone = PixelsBackbone(size=8)
    backbone.load()
    dataset = data.ImageFolderSource(path=str(class_folder)).load(seed=0)
    images = [data.decode_rgb(r, i, None) for i, r in enumerate(data.undecoded(dataset)["image"])]
    batch = backbone.prepare(images)
    embedded = backbone.embed_with_grad(batch)
    assert isinstance(embedded, torch.Tensor)
    np.testing.assert_array_equal(embedded.numpy(), backbone.start_features(batch)()["embed"])


def test_a_moved_checkpoint_is_read_where_it_is_and_relative_paths_are_recorded_absolute(
        finetuned, studied, tmp_path, monkeypatch):
    """A checkpoint folder moved after fine-tuning is read from where it is now (its record named the
    folder it was written to, and the study failed on a model.name the user never set). A relative
    dataset.path or model.name is recorded absolute, hub ids as they are. The study's run says what it
    read: its config.yaml holds the base model and the images of the record, not the default model."""
    import shutil

    from omegaconf import OmegaConf

    from latentmap.finetune import _local_paths_absolute, read_record

    root, _ = finetuned
    moved = tmp_path / "elsewhere" / "tiny-moved"
    shutil.copytree(root / "checkpoints" / TINY, moved)
    record = read_record(str(moved))
    assert record["reload"]["name"] == str(moved.resolve())
    original = read_record(str(root / "checkpoints" / TINY))
    assert original["reload"]["name"] == str((root / "checkpoints" / TINY).resolve())
    assert {k: v for k, v in record.items() if k != "reload"} == {k: v for k, v in original.items() if k != "reload"}
    loaded = TransformersBackbone(name=record["reload"]["name"])
    loaded.load("cpu")  # the moved folder's weights load

    monkeypatch.chdir(root)
    node = {"_target_": "x", "path": "images", "name": "google/vit-base-patch16-224", "limit": 5}
    assert _local_paths_absolute(node) == {**node, "path": str((root / "images").resolve())}

    _, _, out = studied
    client, (logged,) = mlflow_runs(out)
    config = OmegaConf.load(client.download_artifacts(logged.info.run_id, "config.yaml"))
    assert config.model.name == original["base_model"]["name"] and config.dataset.path == str(root / "images")
    # ... and its config hash is the command's, which resume=true looks up before the study reads its record
    from latentmap.task import run_digest

    command = compose(["experiment=finetune_study", f"finetuned={root / 'checkpoints' / TINY}", "reducer=pca",
                       "metrics.k=3", "study.permutations=50", "study.bootstrap=20"], out)
    assert logged.data.tags["latentmap.config_hash"] == run_digest(command)


def test_the_study_refuses_a_model_or_dataset_it_would_ignore(finetuned, tmp_path):
    """model=, dataset.* and run.py's keys the study does not read (layer=, pool=, reducer=, seed=)
    on a study's command line were ignored, and logged as params."""
    root, _ = finetuned
    for extra, says in (("model=resnet", "reads the base model and the images from "),
                        ("dataset.limit=4", "reads the base model and the images from "),
                        ("layer=3", "does not read layer: it compares every block, pooled by study_pool; drop it"),
                        ("reducer=pca", "does not read reducer: it maps the final embeddings with AlignedUMAP"),
                        ("seed=7", "does not read seed: its split, half-samples and maps follow the seed the "
                                   "fine-tuning recorded")):
        code, out = run_script(["run.py", f"output_dir={tmp_path}", "experiment=finetune_study",
                                f"finetuned={root / 'checkpoints' / TINY}", extra], tmp_path)
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert code == 1 and "Traceback" not in out and len(errors) == 1, out[-2000:]
        assert f"{extra}: experiment=finetune_study {says}" in errors[0], errors[0]
    assert not (tmp_path / "mlflow.db").exists() or mlflow_runs(tmp_path)[1] == []


def test_the_study_refuses_a_checkpoint_or_held_out_images_changed_since_the_fine_tuning(finetuned, tmp_path):
    """Other weights copied into the checkpoint were studied as the fine-tuned ones (their random
    layers read as what fine-tuning changed), and images added to the dataset folder moved the split,
    so the study scored images the fine-tuning trained on: both are one line before any run. A
    moved checkpoint and a moved image folder are the same ones; a damaged record is one line."""
    import shutil

    from latentmap.errors import ConfigError
    from latentmap.finetune_study import prepare_study

    root, _ = finetuned
    record = json.loads((root / "checkpoints" / TINY / "latentmap.json").read_text())
    copy, images = tmp_path / "copy", tmp_path / "images"
    shutil.copytree(root / "checkpoints" / TINY, copy)
    shutil.copytree(record["dataset"]["path"], images)
    (copy / "latentmap.json").write_text(json.dumps({**record, "dataset": {**record["dataset"], "path": str(images)}}))

    def prepare():
        return prepare_study(compose(["experiment=finetune_study", f"finetuned={copy}", "metrics.k=3"], tmp_path))

    prepare()  # the checkpoint and the images moved: the same files, the same held-out images
    (copy / ".DS_Store").write_bytes(b"a copy's hidden file")  # not the checkpoint's
    prepare()
    first_class = sorted(p for p in images.iterdir() if p.is_dir())[0]
    for i in range(3):  # three more images of one class: every class's split moves
        shutil.copy(sorted(first_class.iterdir())[0], first_class / f"added-{i}.png")
    with pytest.raises(ConfigError, match=rf"^finetuned='{re.escape(str(copy))}': its held-out images are not the ones "
                                          r"fine-tuning held out: images were added to, removed from or relabelled"):
        prepare()
    for added in first_class.glob("added-*.png"):
        added.unlink()
    prepare()
    weights = next(p for p in copy.rglob("*.safetensors") if p.name != "head.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # other weights, same size
    with pytest.raises(ConfigError, match=r"the checkpoint's files changed since scripts/finetune.py wrote them"):
        prepare()
    for text, says in (("{\"base_model\": ", "its latentmap.json cannot be read"), ("{}", "its latentmap.json lacks "
                                                                                      "base_model, dataset, seed")):
        (copy / "latentmap.json").write_text(text)
        with pytest.raises(ConfigError, match=rf"^finetuned='{re.escape(str(copy))}': {says}"):
            prepare()


def test_the_study_refuses_a_base_whose_weights_changed_since_the_fine_tuning(finetuned, tiny_vit, tmp_path):
    """The record holds the base's weight fingerprint (the cache key's): a base overwritten at the same
    path since was compared against silently. Here the record is edited instead of the shared model."""
    import shutil

    from latentmap.errors import ConfigError
    from latentmap.finetune_study import prepare_study

    root, _ = finetuned
    record = json.loads((root / "checkpoints" / TINY / "latentmap.json").read_text())
    assert record["base_weights"] == TransformersBackbone(name=str(tiny_vit)).identity()["weights"]
    other = tmp_path / "tiny-other-base"
    shutil.copytree(root / "checkpoints" / TINY, other)
    (other / "latentmap.json").write_text(json.dumps({**record, "base_weights": "0" * 64}))
    cfg = compose(["experiment=finetune_study", f"finetuned={other}", "metrics.k=3"], tmp_path)
    with pytest.raises(ConfigError, match=rf"^the base model {re.escape(str(tiny_vit))} is not the one .* was "
                                          r"fine-tuned from: its weights changed since"):
        prepare_study(cfg)


def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_training(tiny_vit, class_folder, tmp_path):
    """checkpoint_dir under a file (or on /proc) trained every epoch, then failed with a
    FileNotFoundError traceback saving the checkpoint: one line before any work, no run, nothing made."""
    from latentmap.errors import ConfigError

    (tmp_path / "a-file").write_text("x")
    cfg = _compose_finetune(["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder",
                             f"dataset.path={class_folder}", "epochs=1",
                             f"checkpoint_dir={tmp_path / 'a-file' / 'checkpoints'}"], tmp_path)
    with pytest.raises(ConfigError, match=r"^checkpoint_dir='.*/a-file/checkpoints': .* cannot be written "
                                          r"\(.*a-file is not a folder\): choose a writable checkpoint_dir="):
        finetune(cfg)
    assert mlflow_runs(tmp_path)[1] == []


def test_a_crash_loading_the_model_is_a_failed_run_with_its_traceback(tiny_vit, class_folder, tmp_path, monkeypatch):
    """The model loads before the run (so that frozen_layers is checked first); a crash there that is
    no user's mistake still ends in a FAILED run with its error and traceback, as it did in the run."""
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom: a truncated weights file")

    monkeypatch.setattr(TransformersBackbone, "load", broken)
    cfg = _compose_finetune(["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder",
                             f"dataset.path={class_folder}", "epochs=1"], tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        finetune(cfg)
    client, (failed,) = mlflow_runs(tmp_path)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == "RuntimeError: boom: a truncated weights file"
    assert failed.data.tags["latentmap.role"] == "finetune"
    assert "Traceback" in Path(client.download_artifacts(failed.info.run_id, "error.txt")).read_text()


def test_a_timm_checkpoint_moved_is_read_where_it_is_and_a_bare_model_name_stays(tmp_path, monkeypatch):
    """timm's reload names its weights file (checkpoint_path), not the folder: re-pointed too. A model
    name without a folder in it (resnet18) is not made a path, even beside a ./resnet18 folder."""
    from latentmap.finetune import _local_paths_absolute, read_record

    written = tmp_path / "was" / "rt"
    moved = tmp_path / "now" / "rt"
    moved.mkdir(parents=True)
    (moved / "latentmap.json").write_text(json.dumps({"reload": {
        "_target_": "latentmap.models.TimmBackbone", "name": "resnet18", "pretrained": False,
        "checkpoint_path": str(written / "model.safetensors")}, "seed": 0, "base_model": {}, "dataset": {}}))
    reload = read_record(str(moved))["reload"]
    assert reload["checkpoint_path"] == str(moved.resolve() / "model.safetensors") and reload["name"] == "resnet18"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    assert _local_paths_absolute({"name": "resnet18", "checkpoint_path": None}) == {"name": "resnet18",
                                                                                     "checkpoint_path": None}


def test_a_study_s_config_hash_follows_its_checkpoint_s_files(finetuned, tmp_path):
    """resume=true skipped a study whose checkpoint a fine-tuning of the same name had replaced: the
    hash held only the finetuned= path. It now holds the checkpoint's files too."""
    import shutil

    from latentmap.task import run_digest

    root, _ = finetuned
    copy = tmp_path / "tiny"
    shutil.copytree(root / "checkpoints" / TINY, copy)
    cfg = compose(["experiment=finetune_study", f"finetuned={copy}"], tmp_path)
    before = run_digest(cfg)
    assert run_digest(compose(["experiment=finetune_study", f"finetuned={copy}"], tmp_path)) == before
    (copy / "head.safetensors").write_bytes((copy / "head.safetensors").read_bytes()[::-1])
    assert run_digest(cfg) != before


def test_a_checkpoint_is_replaced_only_when_asked_and_only_if_it_is_one(tiny_vit, tmp_path):
    """A second fine-tuning to the same name used to replace the first's checkpoint silently. It is
    refused before training unless overwrite=true; a folder latentmap did not write is never
    replaced, whatever overwrite says."""
    from latentmap.errors import ConfigError
    from latentmap.finetune import _prepare_finetune

    write_class_images(tmp_path / "images", n_per_class=6, seed=2)
    common = ["model=hf", f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={tmp_path / 'images'}",
              "epochs=1", "batch_size=6", "tracking=none"]
    finetune(_compose_finetune([*common, "name=twice", "optimizer.lr=1e-3"], tmp_path))
    weights = tmp_path / "checkpoints" / "twice" / "model.safetensors"
    first = weights.read_bytes()
    again = _compose_finetune([*common, "name=twice", "optimizer.lr=1e-2"], tmp_path)
    with pytest.raises(ConfigError, match=r"^name=twice: .*twice already holds a fine-tuned checkpoint; choose "
                                          r"another name=, or overwrite=true to replace it$"):
        _prepare_finetune(again)
    assert weights.read_bytes() == first
    finetune(_compose_finetune([*common, "name=twice", "optimizer.lr=1e-2", "overwrite=true"], tmp_path))
    assert weights.read_bytes() != first  # replaced by the second training (another learning rate)
    record = json.loads((weights.parent / "latentmap.json").read_text())
    assert record["reload"]["name"] == str(weights.parent.resolve())

    (tmp_path / "checkpoints" / "notes").mkdir()
    (tmp_path / "checkpoints" / "notes" / "mine.txt").write_text("keep")
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ConfigError, match=r"^name=notes: .*notes exists and is not a latentmap checkpoint"):
            _prepare_finetune(_compose_finetune([*common, "name=notes", *extra], tmp_path))
    assert (tmp_path / "checkpoints" / "notes" / "mine.txt").read_text() == "keep"


def test_a_finetuning_sweep_writes_one_checkpoint_per_job(tiny_vit, tmp_path):
    """Without name=, every job of a sweep wrote the same folder (<model>-<source>-seed<seed>), and
    only the last job's checkpoint was left. The default name now ends with what the sweep varies."""
    write_class_images(tmp_path / "images", n_per_class=6, seed=3)
    code, output = run_script(["scripts/finetune.py", "-m", f"output_dir={tmp_path}", "model=hf",
                               f"model.name={tiny_vit}", "dataset=imagefolder", f"dataset.path={tmp_path / 'images'}",
                               "epochs=1", "batch_size=6", "optimizer.lr=1e-3,1e-2"], tmp_path)
    assert code == 0, output
    # its report is written; compare.html, which puts maps side by side, is skipped in one line (it was a
    # 30-line "Missing key metrics" traceback: fine-tuning runs have no maps)
    assert "could not write the sweep summary" not in output and "Traceback" not in output, output[-3000:]
    assert "no compare.html for this sweep: its runs are not mapping runs" in output
    written = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert written == [f"{tiny_vit.name}-ImageFolderSource-seed42-optimizer.lr-0.001",
                       f"{tiny_vit.name}-ImageFolderSource-seed42-optimizer.lr-0.01"], written
    weights = {(tmp_path / "checkpoints" / name / "model.safetensors").read_bytes() for name in written}
    assert len(weights) == 2  # two trainings, not one written twice
    # a name Hydra's command line takes as it is (optimizer.lr=0.001 in it was refused: "mismatched input '='")
    study = compose(["experiment=finetune_study", f"finetuned={tmp_path / 'checkpoints' / written[0]}"], tmp_path)
    assert study.finetuned == str(tmp_path / "checkpoints" / written[0])


def test_fine_tuning_skips_an_unreadable_image_as_dataset_on_error_says(tiny_vit, tmp_path):
    """dataset.on_error=skip (the default) was ignored by fine-tuning: one unreadable file ended the
    training with "set dataset.on_error=skip", the setting in use. It now leaves its batch, named in a
    warning; with on_error=raise it still ends the run in one line."""
    write_class_images(tmp_path / "images", n_per_class=6, seed=3)
    broken = sorted(p for p in (tmp_path / "images").iterdir() if p.is_dir())[0] / "zz-broken.png"
    broken.write_bytes(b"not an image")
    command = ["scripts/finetune.py", f"output_dir={tmp_path}", "model=hf", f"model.name={tiny_vit}",
               "dataset=imagefolder", f"dataset.path={tmp_path / 'images'}", "epochs=1", "batch_size=4",
               "num_workers=0", "name=skips"]
    code, output = run_script(command, tmp_path)
    assert code == 0 and "Traceback" not in output, output[-3000:]
    assert "skipping unreadable image" in output and "zz-broken.png" in output
    assert (tmp_path / "checkpoints" / "skips" / "latentmap.json").is_file()
    code, output = run_script([*command[:-1], "name=raises", "dataset.on_error=raise"], tmp_path)
    assert code == 1 and "Traceback" not in output and "zz-broken.png" in output, output[-3000:]
    assert not (tmp_path / "checkpoints" / "raises").exists()


def test_a_checkpoint_name_stays_inside_checkpoint_dir_and_its_files_are_readable_as_the_umask_allows(tmp_path):
    """name=../../x wrote outside checkpoint_dir; the checkpoint's folder and files kept mkdtemp's
    private 0700 mode (colleagues on a shared machine could not read them)."""
    import os
    import stat

    import torch

    from latentmap.errors import ConfigError
    from latentmap.finetune import _save_atomically, checkpoint_folder

    for name in ("../../escape", "a/b", ".."):
        cfg = _compose_finetune(["model=pixels", f"name={name}"], tmp_path)
        with pytest.raises(ConfigError, match=r"is a folder name inside checkpoint_dir, without '/' or '\.\.'"):
            checkpoint_folder(cfg, "m")

    class Saved:
        def save(self, folder):
            (folder / "model.safetensors").write_bytes(b"weights")
            return {"name": str(folder)}

    umask = os.umask(0o022)
    try:
        _save_atomically(Saved(), torch.nn.Linear(2, 2), tmp_path / "ckpt", {"seed": 0})
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ckpt").iterdir()} == {0o644}


def test_held_out_images_the_study_would_refuse_are_said_before_training(tiny_vit, tmp_path, caplog):
    """A class of 2 images held out at 0.5 left 1 held-out image: fine-tuning succeeded, then the study
    refused it ("a class has only 1 image") with a fix its command line forbids. Said when the
    fine-tuning starts, with run.py's default metrics; a held-out part the study takes says nothing."""
    from latentmap.finetune import _say_what_the_study_refuses

    write_class_images(tmp_path / "images", n_per_class=2, seed=3)
    held = data.ImageFolderSource(path=str(tmp_path / "images")).load(seed=0).select([0, 2, 4, 5, 6, 7])
    with caplog.at_level("WARNING", logger="latentmap.finetune"):
        _say_what_the_study_refuses(held, ["blue", "green", "red", "yellow"])
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("the fine-tuning study would refuse these 6 held-out images with its default metrics ("
                           "metrics.k=10 is too large for N=6") and "raise dataset.holdout or dataset.limit now" in line
    caplog.clear()
    write_class_images(tmp_path / "more", n_per_class=12, seed=3)
    with caplog.at_level("WARNING", logger="latentmap.finetune"):
        _say_what_the_study_refuses(data.ImageFolderSource(path=str(tmp_path / "more")).load(seed=0),
                                    ["blue", "green", "red", "yellow"])
    assert not caplog.records


def test_a_held_out_accuracy_that_fell_after_its_peak_is_said(caplog):
    from latentmap.finetune import _note_overfitting

    with caplog.at_level("WARNING", logger="latentmap.finetune"):
        _note_overfitting([0.25, 0.60, 0.80, 0.70])
    assert "peaked at epoch 2 (0.8000) and ended at 0.7000" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="latentmap.finetune"):
        _note_overfitting([0.25, 0.60, 0.80, 0.80])  # the last epoch is at the peak
        _note_overfitting([0.25, 0.60])
        _note_overfitting([0.25])
    assert not caplog.text


def test_a_swept_value_becomes_a_plain_distinct_part_of_a_checkpoint_name():
    """Swept paths that share a last part (/a/train, /b/train) gave one name; a value with = or , made
    a name Hydra's command line refuses. Each value is now plain, and two values stay two names."""
    from latentmap.finetune import _plain

    assert _plain("/data/a/train") == "data_a_train" and _plain("/data/b/train") == "data_b_train"
    assert _plain("1e-3") == "1e-3" and _plain("{a: 1, b: 2}") == "a_1_b_2"
    long_a, long_b = "/very/long/" + "x" * 60 + "/a", "/very/long/" + "x" * 60 + "/b"
    assert len(_plain(long_a)) <= 48 and _plain(long_a) != _plain(long_b)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", _plain(v)) for v in ("a=b,c", "~/x y", "é", "//"))
