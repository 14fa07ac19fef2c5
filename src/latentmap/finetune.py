"""Fine-tuning a backbone with a linear head, and the base-vs-fine-tuned study.

``finetune(cfg)`` trains on the ``train`` part of a seeded, stratified holdout split and
evaluates on the ``holdout`` part after every epoch; it saves the backbone in its own format
(transformers ``save_pretrained`` folder, or a timm ``model.safetensors``) with a
``latentmap.json`` that records the base model, the dataset, the split and how to reload it.

``study(cfg)`` reads that record, so it always compares base and fine-tuned on the images the
fine-tuning never saw: per-block CKA between the two, per-block silhouette and k-NN accuracy of
each and their deltas, and the two 2-D maps side by side, the fine-tuned map aligned to the base
map by an orthogonal Procrustes rotation (plus scale and shift) of its coordinates.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentmap import cache, data, jit, measures, metrics, plots, reduce, resampling, settings, stats
from latentmap.config import instantiate_node
from latentmap.errors import ConfigError
from latentmap.extract import Extraction, Rows, collate
from latentmap.task import tracked_task
from latentmap.tracking import Tracker

log = logging.getLogger(__name__)

RECORD = "latentmap.json"
# A parameter's block index: encoder.layer.3., encoder.layers.3., stages.1., blocks.4., layer.7.
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|blocks|stages)\.(\d+)\.")


def freeze_first_blocks(module, count: int, model_name: str) -> int:
    """Freeze the stem (every parameter before the first block) and blocks ``0..count-1``.

    Returns the number of frozen parameter tensors. Raises ConfigError when the model's
    parameter names show no numbered blocks to count.
    """
    settings.require("frozen_layers", count)
    if count == 0:
        return 0
    frozen, seen_block = 0, False
    for name, parameter in module.named_parameters():
        match = _BLOCK.search(name)
        if match:
            seen_block = True
            if int(match.group(1)) < count:
                parameter.requires_grad_(False)
                frozen += 1
        elif not seen_block:
            parameter.requires_grad_(False)
            frozen += 1
    if not seen_block:
        raise ConfigError(f"frozen_layers={count}: {model_name} has no numbered blocks "
                          "(layer.N / layers.N / blocks.N / stages.N) to freeze; use frozen_layers=0")
    return frozen


def _source(cfg_dataset: DictConfig, part: str):
    node = OmegaConf.to_container(cfg_dataset, resolve=True)
    node["part"] = part
    return instantiate_node(OmegaConf.create(node), "dataset")


def _loader(dataset, backbone, batch_size: int, shuffle: bool, seed: int, num_workers: int, max_pixels: int | None):
    from functools import partial

    import torch
    from torch.utils.data import DataLoader

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(Rows(dataset), batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=num_workers,
                      collate_fn=partial(collate, backbone=backbone, max_pixels=max_pixels, with_labels=True),
                      drop_last=shuffle and len(dataset) > batch_size)


def _train_mode(module) -> None:
    """Training mode, except batch norm, which keeps its running statistics: small fine-tuning
    batches give poor statistics, and checkpoints with batch norm folded into the convolutions
    (identity statistics) break outright under batch statistics."""
    import torch

    module.train()
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            child.eval()


def _accuracy(backbone, head, loader) -> float:
    import torch

    backbone.module.eval()
    head.eval()
    correct = total = 0
    with torch.inference_mode():
        for pixel_values, labels in loader:
            logits = head(backbone.embed_with_grad(pixel_values))
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / max(total, 1)


def _save_atomically(backbone, head, folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write the checkpoint into a temporary sibling, then rename it into place."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        reload = backbone.save(staging)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                  str(staging / "head.safetensors"))
        # The reload config must name the final folder, not the staging one.
        reload = json.loads(json.dumps(reload).replace(str(staging.resolve()), str(folder.resolve())))
        record = {**record, "reload": reload}
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return record


def _prepare_finetune(cfg: DictConfig):
    """The checks a user's mistake can fail before any work (no MLflow run is created for them), and
    the two parts of the split: (train set, held-out set, class names)."""
    if not cfg.dataset.holdout:
        raise ConfigError("dataset.holdout=0.0: fine-tuning needs held-out images, e.g. dataset.holdout=0.3")
    seed = int(cfg.seed)
    train_set = _source(cfg.dataset, "train").load(seed=seed)
    held_set = _source(cfg.dataset, "holdout").load(seed=seed)
    names = data.class_names(train_set)
    if names is None or len(names) < 2:
        raise ConfigError("fine-tuning needs a labelled dataset with at least 2 classes")
    return train_set, held_set, names


@tracked_task(prepare=_prepare_finetune,
              describe=lambda cfg: f"finetune {Path(str(cfg.model.get('name', 'model'))).name} · {cfg.epochs} epochs")
def finetune(cfg: DictConfig, tracker: Tracker, prepared) -> dict[str, float]:
    """Fine-tune ``cfg.model`` with a linear head on the train part of ``cfg.dataset``."""
    import torch
    from tqdm.auto import tqdm

    train_set, held_set, names = prepared
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    backbone = instantiate_node(cfg.model, "model")
    backbone.load(cfg.device)
    frozen = freeze_first_blocks(backbone.module, cfg.frozen_layers, backbone.name)
    loading = int(cfg.num_workers), cfg.dataset.max_image_pixels
    train_loader = _loader(train_set, backbone, int(cfg.batch_size), True, seed, *loading)
    held_loader = _loader(held_set, backbone, int(cfg.batch_size), False, seed, *loading)
    with torch.inference_mode():
        probe, _ = next(iter(held_loader))
        width = backbone.embed_with_grad(probe).shape[1]
    head = torch.nn.Linear(width, len(names)).to(backbone.device)
    base_lr = float(cfg.optimizer.lr)
    groups = [{"params": [p for p in backbone.module.parameters() if p.requires_grad], "lr": base_lr},
              {"params": list(head.parameters()), "lr": base_lr * float(cfg.head_lr_multiplier)}]
    optimizer = instantiate_node(cfg.optimizer, "optimizer")(params=groups)
    tracker.set_tags({"base_model": backbone.name, "frozen_tensors": str(frozen),
                      "n_train": str(len(train_set)), "n_heldout": str(len(held_set))})
    scores = {"heldout_acc": _accuracy(backbone, head, held_loader)}
    tracker.log_metrics(scores, step=0)
    log.info("before fine-tuning: held-out accuracy %.3f (linear head at random)", scores["heldout_acc"])
    loss_fn = torch.nn.CrossEntropyLoss()
    for epoch in range(1, int(cfg.epochs) + 1):
        _train_mode(backbone.module)
        head.train()
        total_loss = correct = seen = 0
        for pixel_values, labels in tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch"):
            labels = labels.to(backbone.device)
            logits = head(backbone.embed_with_grad(pixel_values))
            loss = loss_fn(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        scores = {"train_loss": total_loss / seen, "train_acc": correct / seen,
                  "heldout_acc": _accuracy(backbone, head, held_loader)}
        tracker.log_metrics(scores, step=epoch)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in scores.items()))
    name = cfg.name or f"{Path(backbone.name).name}-{Path(str(cfg.dataset._target_)).suffix[1:]}-seed{seed}"
    folder = Path(cfg.checkpoint_dir) / name
    record = _save_atomically(backbone, head, folder, {
        "base_model": OmegaConf.to_container(cfg.model, resolve=True),
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "seed": seed, "classes": names, "heldout_acc": scores["heldout_acc"],
    })
    tracker.set_tags({"checkpoint": str(folder.resolve()), "reload": json.dumps(record["reload"])})
    log.info("saved the fine-tuned backbone to %s", folder.resolve())
    return scores


def _read_record(folder: str) -> dict[str, Any]:
    path = Path(folder).expanduser() / RECORD
    if not path.is_file():
        raise ConfigError(f"finetuned={folder!r} has no {RECORD} ({path.resolve()}): "
                          "point it at a folder written by scripts/finetune.py")
    return json.loads(path.read_text())


def procrustes_align(moving: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``moving`` (N, 2) rotated/reflected, scaled and shifted onto ``reference`` (least squares)."""
    from scipy.linalg import orthogonal_procrustes

    moving_centre, reference_centre = moving.mean(0), reference.mean(0)
    centred, target = moving - moving_centre, reference - reference_centre
    rotation, singular_sum = orthogonal_procrustes(centred, target)
    scale = singular_sum / max(float(np.sum(centred**2)), 1e-12)
    return centred @ rotation * scale + reference_centre


@dataclass
class StudyInputs:
    """What the fine-tuning study checked before its run existed: the checkpoint's record, the
    held-out images with their labels, and both models."""

    record: dict
    dataset: object
    labels: np.ndarray
    names: list[str]
    models: dict


def prepare_study(cfg: DictConfig) -> StudyInputs:
    """Every check of the fine-tuning study before its MLflow run is created (a bad ``finetuned=``
    path or a ``metrics.k`` too large for the held-out images is one line and no run; every setting's
    own rule was checked by tracked_task before this)."""
    record = _read_record(cfg.finetuned)
    dataset = _source(OmegaConf.create(record["dataset"]), "holdout").load(seed=int(record["seed"]))
    labels, names = data.labels_of(dataset), data.class_names(dataset)
    metrics.check(len(dataset), labels, int(cfg.metrics.k), int(cfg.metrics.folds))
    models = {"base": instantiate_node(OmegaConf.create(record["base_model"]), "base model"),
              "finetuned": instantiate_node(OmegaConf.create(record["reload"]), "finetuned")}
    return StudyInputs(record, dataset, labels, names, models)


@tracked_task(prepare=prepare_study, describe=lambda cfg: f"finetune study · {Path(str(cfg.finetuned)).name}")
def study(cfg: DictConfig, tracker: Tracker, inputs: StudyInputs) -> dict[str, float]:
    """Base vs fine-tuned on the held-out images named by the checkpoint's record."""
    record, dataset, labels, names, models = inputs.record, inputs.dataset, inputs.labels, inputs.names, inputs.models
    seed = int(record["seed"])
    k, distance = int(cfg.metrics.k), str(cfg.metrics.distance)
    how = Extraction.of(cfg)
    first = {side: cache.embeddings(m, dataset, 0, cfg.study_pool, cfg.cache_dir, how) for side, m in models.items()}
    blocks = {side: cache.block_features(cfg.cache_dir, found.key, cfg.study_pool) for side, found in first.items()}
    final = {side: cache.embeddings(m, dataset, -1, "embed", cfg.cache_dir, how).values for side, m in models.items()}
    tracker.set_tags({**{f"cache_key_{side}": found.key for side, found in first.items()}})
    tracker.set_tags({"latentmap.role": "finetune_study", "base_model": models["base"].name,
                      "finetuned": str(Path(cfg.finetuned).resolve()), "n_images": str(len(dataset))})

    import pandas as pd

    folds, resamples, confidence = int(cfg.metrics.folds), cfg.metrics.bootstrap, cfg.metrics.confidence
    settings = cfg.study  # conf/config.yaml: the panel's images, permutations, resamples and k
    null_rows = measures.subsample_rows(len(dataset), int(settings.null_images), seed)
    panel_k = min(int(settings.k), max(1, len(null_rows) // 4))
    halves = resampling.halves(labels, len(dataset), resamples, seed)
    rows, overlap = [], []
    for index, (base_block, tuned_block) in enumerate(zip(blocks["base"], blocks["finetuned"])):
        row = {"layer_index": index, "relative_depth": index / max(len(blocks["base"]) - 1, 1)}
        # Every metric of the block for base and fine-tuned, recomputed on the same half-samples, and
        # their paired difference (same images, same halves).
        evaluated = {side: resampling.evaluate(
            block, None, labels, halves, k=k, folds=folds, seed=seed, distance=distance,
            weighted_k=int(cfg.metrics.knn_weighted_k), temperature=float(cfg.metrics.knn_temperature),
            probe=bool(cfg.metrics.probe))
            for side, block in (("base", base_block), ("finetuned", tuned_block))}
        metric_names = [m for m in evaluated["base"].values if m != "twonn_id"]
        for metric in metric_names:
            found = stats.paired_halves(evaluated["finetuned"].values[metric], evaluated["base"].values[metric],
                                        evaluated["finetuned"].resampled[metric], evaluated["base"].resampled[metric],
                                        halves.scale, len(dataset), confidence)
            row.update({f"{metric}_base": found.b, f"{metric}_finetuned": found.a, f"delta_{metric}": found.difference,
                        f"delta_{metric}_lo": found.lo, f"delta_{metric}_hi": found.hi,
                        f"delta_{metric}_p": found.p_value})
        # The similarity panel of base and fine-tuned block, with its nulls and intervals.
        panel = measures.panel(base_block[null_rows], tuned_block[null_rows], panel_k,
                              int(settings.permutations), int(settings.bootstrap),
                              confidence, seed + index)
        for measure, result in panel.items():
            row.update({f"{measure}": result.value, f"{measure}_lo": result.lo, f"{measure}_hi": result.hi,
                        f"{measure}_p": result.p_value, f"{measure}_null": result.null_mean})
        overlap.append(measures.mutual_knn_per_image(base_block, tuned_block, min(k, len(dataset) - 2)))
        rows.append(row)
        tracker.log_metrics({"cka_base_finetuned": row["cka"], "cka_debiased_base_finetuned": row["cka_debiased"],
                             **{f"delta_{m}": row[f"delta_{m}"] for m in metric_names}}, step=index)
    table = pd.DataFrame(rows)
    # Two families, each Benjamini-Hochberg adjusted: the blocks x metrics of the paired differences,
    # and the blocks x measures of the panel's nulls.
    for family in ([f"delta_{m}" for m in metric_names], list(measures.PANEL)):
        adjusted = stats.adjust(table[[f"{c}_p" for c in family]].to_numpy().ravel(), "bh")
        for column, values in zip(family, adjusted.reshape(len(table), len(family)).T):
            table[f"{column}_p_adj"] = values
    table.to_csv(tracker.path("tables/per_layer.csv"), index=False)
    overlap = np.asarray(overlap, dtype=np.float32)  # (blocks, N): share of k nearest neighbours kept

    coords = _aligned_maps(final, distance, seed, labels)
    tracker.save_arrays({**{f"coords_{side}": values for side, values in coords.items()},
                         "labels": labels, "indices": np.asarray(dataset["index"], np.int64),
                         "knn_overlap": overlap})

    scores = {}
    for side in ("base", "finetuned"):
        scores[f"knn_acc_hd_{side}"] = metrics.knn_accuracy(final[side], labels, k, folds, distance, seed)
        scores[f"silhouette_hd_{side}"] = metrics.silhouette(final[side], labels, distance)
    scores["cka_first_block"] = float(table["cka"].iloc[0])
    scores["cka_last_block"] = float(table["cka"].iloc[-1])
    scores["cka_debiased_last_block"] = float(table["cka_debiased"].iloc[-1])
    scores["knn_overlap_last_block"] = float(overlap[-1].mean())
    tracker.log_metrics(scores)
    changed = np.argsort(overlap[-1], kind="stable")[: int(cfg.plots.grid_images)]
    figures = _study_figures(table, coords, labels, names, models["base"].name, overlap[-1])
    from latentmap.figures import thumbnail_arrays

    indices = np.asarray(dataset["index"], np.int64)
    figures["most_changed"] = plots.sample_grid(
        thumbnail_arrays(dataset, changed, max_pixels=data.max_pixels_of(OmegaConf.create(record["dataset"]))),
        [f"{names[labels[r]]} #{indices[r]}\nkept {overlap[-1][r]:.0%}" for r in changed],
        f"the images whose {min(k, len(dataset) - 2)} nearest neighbours changed most (final block)")
    for name, figure in figures.items():
        figure.savefig(tracker.path(f"plots/{name}.png"), dpi=120)
    _write_study_report(tracker, table, metric_names, cfg.finetuned, models["base"].name, len(dataset))
    return scores


def _write_study_report(tracker: Tracker, table, metric_names: list[str], finetuned: str, base_name: str,
                        n_images: int) -> None:
    """``report.html``: the fine-tuning study on one self-contained page (:mod:`latentmap.report`)."""
    from latentmap import report

    deltas = [f"delta_{m}" for m in metric_names]
    sections = [
        ("Per block: fine-tuned minus base", "The paired difference of each metric over the same held-out "
         "images on the same half-samples, its interval and p-value (Student's t over the half-samples), and "
         "the p-value adjusted by Benjamini-Hochberg over every block x metric of this table (one family); "
         "grey: adjusted p >= 0.05.", report.block_table(table, deltas)),
        ("Per block: how alike base and fine-tuned are", "Each measure of the similarity panel with its bootstrap "
         "interval, permutation p-value (rows of one side shuffled) and that adjusted by Benjamini-Hochberg over "
         "every block x measure (one family); Procrustes is a distance.",
         report.block_table(table, list(measures.PANEL))),
    ]
    figures = {name: tracker.path(f"plots/{name}.png") for name in
               ("finetune_depth", "finetune_maps", "neighbourhood_change", "most_changed")}
    text = report.page(f"latentmap fine-tuning study · {Path(str(finetuned)).name}",
                       f"{Path(base_name).name} against its fine-tuned version on {n_images} held-out images.",
                       figures, sections)
    tracker.path("report.html").write_text(text, encoding="utf-8")


def _aligned_maps(final: dict[str, np.ndarray], distance: str, seed: int, labels) -> dict[str, np.ndarray]:
    """Base and fine-tuned final embeddings mapped so that their maps are comparable:

    * ``aligned_umap_base`` / ``aligned_umap_finetuned``: umap-learn's AlignedUMAP fitted on both at
      once with the identity relation between the same images: aligned by construction;
    * ``pca_base`` / ``pca_finetuned_aligned``: each side's own PCA, the fine-tuned one
      Procrustes-aligned onto the base (a linear map: the fair case for a similarity transform).
    """
    from sklearn.decomposition import PCA
    from umap import AlignedUMAP

    jit.enable()  # its numba code from the disk cache (latentmap.jit)
    spaces = {side: metrics.embedding_space(values, distance) for side, values in final.items()}
    n = len(spaces["base"])
    with reduce.seeded_umap():
        aligned = AlignedUMAP(n_neighbors=min(15, n - 1), random_state=seed, n_epochs=200).fit(
            [spaces["base"], spaces["finetuned"]], relations=[{i: i for i in range(n)}])
    pca = {side: PCA(2, random_state=seed).fit_transform(values) for side, values in spaces.items()}
    return {"aligned_umap_base": aligned.embeddings_[0].astype(np.float32),
            "aligned_umap_finetuned": aligned.embeddings_[1].astype(np.float32),
            "pca_base": pca["base"].astype(np.float32),
            "pca_finetuned": pca["finetuned"].astype(np.float32),
            "pca_finetuned_aligned": procrustes_align(pca["finetuned"], pca["base"]).astype(np.float32)}


def _study_figures(table, coords, labels, names, base_name: str, overlap) -> dict[str, Any]:
    from matplotlib.figure import Figure

    depth = Figure(figsize=(13, 4.8), layout="constrained")
    similar_ax, delta_ax = depth.subplots(1, 2)
    for measure, label in (("cka", "linear CKA (biased)"), ("cka_debiased", "debiased CKA"),
                           ("mutual_knn", "mutual k-NN"), ("rsa", "RSA")):
        line = similar_ax.plot(table["relative_depth"], table[measure], marker="o", label=label)[0]
        if table[f"{measure}_lo"].notna().all():
            similar_ax.fill_between(table["relative_depth"], table[f"{measure}_lo"], table[f"{measure}_hi"],
                                    color=line.get_color(), alpha=0.15, linewidth=0)
    similar_ax.set_ylim(-0.05, 1.05)
    similar_ax.set_xlabel("relative depth")
    similar_ax.set_ylabel("base vs fine-tuned")
    similar_ax.set_title("how much each block changed (bands: 95% intervals)")
    similar_ax.legend(fontsize=8)
    for metric in ("silhouette_hd", "knn_acc_hd"):
        if f"delta_{metric}" not in table:
            continue
        line = delta_ax.plot(table["relative_depth"], table[f"delta_{metric}"], marker="o", label=metric)[0]
        delta_ax.fill_between(table["relative_depth"], table[f"delta_{metric}_lo"], table[f"delta_{metric}_hi"],
                              color=line.get_color(), alpha=0.15, linewidth=0)
    delta_ax.axhline(0, color="grey", linewidth=0.8)
    delta_ax.set_xlabel("relative depth")
    delta_ax.set_title("fine-tuned minus base, per block (paired, 95% intervals)")
    delta_ax.legend(fontsize=8)
    for ax in (similar_ax, delta_ax):
        ax.grid(alpha=0.3)

    maps = Figure(figsize=(15, 12), layout="constrained")
    colours = plots.class_colors(len(names))
    size = float(np.clip(4000 / max(len(labels), 1), 2, 40))
    panels = (("aligned_umap_base", f"base: {Path(base_name).name} (AlignedUMAP: aligned by construction)"),
              ("aligned_umap_finetuned", "fine-tuned (AlignedUMAP: aligned by construction)"),
              ("pca_base", "base (PCA)"), ("pca_finetuned_aligned", "fine-tuned (PCA, Procrustes-aligned to base)"))
    for ax, (side, title) in zip(maps.subplots(2, 2).flat, panels):
        for c, name in enumerate(names):
            mask = labels == c
            ax.scatter(*coords[side][mask].T, s=size, color=colours[c], label=name, alpha=0.75, linewidths=0)
            if mask.any():
                ax.annotate(name, coords[side][mask].mean(0), fontsize=8, weight="bold")
        ax.set_title(title, fontsize=10)
    maps.axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False,
                        ncols=max(1, int(np.ceil(len(names) / 25))))

    changed = Figure(figsize=(8, 6.5), layout="constrained")
    ax = changed.add_subplot()
    points = ax.scatter(*coords["aligned_umap_base"].T, c=overlap, cmap="viridis", vmin=0, vmax=1, s=size)
    changed.colorbar(points, ax=ax, label="share of nearest neighbours kept by fine-tuning")
    ax.set_title("base map (AlignedUMAP), coloured by how much each image's neighbourhood changed")
    return {"finetune_depth": depth, "finetune_maps": maps, "neighbourhood_change": changed}
