"""The base-vs-fine-tuned study: ``python run.py experiment=finetune_study finetuned=<checkpoint>``.

``study(cfg)`` reads the checkpoint's record (:func:`latentmap.finetune.read_record`), so it always
compares base and fine-tuned on the images the fine-tuning never saw: per-block similarity panel
between the two, per-block metrics of each and their paired differences, and the two 2-D maps side
by side, the fine-tuned map aligned to the base map (AlignedUMAP, and a Procrustes-aligned PCA).
The figures are drawn by :mod:`latentmap.plots.finetune`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from latentmap import audit, cache, data, jit, measures, metrics, plots, reduce, resampling, stats
from latentmap.config import instantiate_node
from latentmap.extract import Extraction
from latentmap.finetune import read_record, source_part
from latentmap.linked import procrustes_align
from latentmap.plots import finetune as finetune_plots
from latentmap.task import tracked_task
from latentmap.tracking import Tracker

log = logging.getLogger(__name__)


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
    record = read_record(cfg.finetuned)
    _refuse_ignored_overrides(cfg)
    with open_dict(cfg):  # the run's config.yaml and params say what the study reads, not Hydra's defaults
        cfg.model, cfg.dataset = OmegaConf.create(record["base_model"]), OmegaConf.create(record["dataset"])
    dataset = source_part(OmegaConf.create(record["dataset"]), "holdout").load(seed=int(record["seed"]))
    _refuse_changed(cfg.finetuned, record, dataset)
    labels, names = data.labels_of(dataset), data.class_names(dataset)
    metrics.check(len(dataset), labels, int(cfg.metrics.k), int(cfg.metrics.folds), halves=int(cfg.metrics.bootstrap))
    models = {"base": instantiate_node(OmegaConf.create(record["base_model"]), "base model"),
              "finetuned": instantiate_node(OmegaConf.create(record["reload"]), "finetuned")}
    recorded = record.get("base_weights")  # absent in records of an older latentmap
    if recorded and models["base"].identity().get("weights") != recorded:
        from latentmap.errors import ConfigError

        raise ConfigError(f"the base model {models['base'].name} is not the one {cfg.finetuned} was fine-tuned from: "
                          "its weights changed since (latentmap.json recorded their fingerprint), so the study "
                          "would compare against other weights; restore them, or fine-tune again from these")
    return StudyInputs(record, dataset, labels, names, models)


def _refuse_changed(finetuned: str, record: dict, held_out) -> None:
    """The study compares the weights fine-tuning wrote, on the images it held out: a checkpoint whose
    files changed since (other weights copied in: the study read their random layers as what
    fine-tuning changed), or a held-out part that is other images now (files added to or removed
    from the folder move the split, and the study scored images the fine-tuning had trained on), is
    one line before any run. Records of an older latentmap lack the fingerprints and are read as
    they are."""
    from latentmap.errors import ConfigError
    from latentmap.finetune import checkpoint_digest, held_out_digest

    folder, named = Path(str(finetuned)).expanduser(), f"finetuned={str(finetuned)!r}"
    if record.get("checkpoint_sha256") and checkpoint_digest(folder) != record["checkpoint_sha256"]:
        raise ConfigError(f"{named}: the checkpoint's files changed since scripts/finetune.py wrote "
                          "them (its latentmap.json recorded their fingerprint), so the study would not compare the "
                          "fine-tuned weights; restore them, or fine-tune again")
    if record.get("heldout") and held_out_digest(held_out) != record["heldout"]:
        where = record["dataset"].get("path") or record["dataset"].get("name") or "the dataset"
        raise ConfigError(f"{named}: its held-out images are not the ones fine-tuning held out: images "
                          f"were added to, removed from or relabelled in {where} since, which moves the split, so "
                          "the study would score images the fine-tuning trained on; restore them, or fine-tune again")


def _refuse_ignored_overrides(cfg: DictConfig) -> None:
    """The study reads its base model and images from the checkpoint's record: a ``model=`` or
    ``dataset.*`` on its command line would be ignored (and was, silently, while logged as a param)."""
    from hydra.core.hydra_config import HydraConfig

    from latentmap.errors import ConfigError
    from latentmap.tracking.run import RECORDED_GROUPS

    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        key = str(override).lstrip("+~").split("=", 1)[0]
        group = key.split(".", 1)[0].split("@")[0]
        if group in RECORDED_GROUPS:
            raise ConfigError(f"{override}: experiment=finetune_study reads the base model and the images from "
                              f"{Path(str(cfg.finetuned)) / 'latentmap.json'}, so this would be ignored; drop it "
                              "(to study another model or other images, fine-tune it with scripts/finetune.py)")
        if group in _NOT_READ:
            raise ConfigError(f"{override}: experiment=finetune_study does not read {group}: {_NOT_READ[group]}; "
                              "drop it")


# run.py's keys the study has no use for (a value given for one was logged as a param and ignored).
_SEEDED = "its split, half-samples and maps follow the seed the fine-tuning recorded (the held-out images are its)"
_NOT_READ = {"layer": "it compares every block, pooled by study_pool",
             "pool": "it pools every block by study_pool (mean, or cls for a model with a class token)",
             "reducer": "it maps the final embeddings with AlignedUMAP and with PCA aligned by Procrustes",
             "seed": _SEEDED, "data_seed": _SEEDED, "reducer_seed": _SEEDED, "cv_seed": _SEEDED,
             "audit": "it audits no data (run run.py on the images for the audit)",
             "zeroshot": "it scores no zero-shot accuracy"}


@tracked_task(prepare=prepare_study, role="finetune_study",
              describe=lambda cfg: f"finetune study · {Path(str(cfg.finetuned)).name}")
def study(cfg: DictConfig, tracker: Tracker, inputs: StudyInputs) -> dict[str, float]:
    """Base vs fine-tuned on the held-out images named by the checkpoint's record."""
    record, dataset, labels, names, models = inputs.record, inputs.dataset, inputs.labels, inputs.names, inputs.models
    seed = int(record["seed"])
    k, distance = int(cfg.metrics.k), str(cfg.metrics.distance)
    # The images are read as the fine-tuning read them: the record's dataset settings, not this config's.
    images = OmegaConf.create(record["dataset"])
    on_error = images.get("on_error", "skip")  # logged before the key
    max_pixels = images.get("max_image_pixels", data.PIL_MAX_IMAGE_PIXELS)  # logged before the key
    how = Extraction(cfg.batch_size, cfg.num_workers, cfg.device, cfg.precision, on_error, max_pixels,
                     cfg.reuse_freed_memory, data.intensity_of(images))
    from latentmap.errors import ConfigError, rename_keys

    try:
        first = {side: cache.embeddings(m, dataset, 0, cfg.study_pool, cfg.cache_dir, how)
                 for side, m in models.items()}
    except ConfigError as error:  # pool=cls is not available ...: the study's key is study_pool, which takes no embed
        raise ConfigError(rename_keys(str(error), {"pool=": "study_pool="}).replace(" or study_pool=embed", "")) \
            from error
    kept, positions = cache.common_rows(len(dataset), {side: found.skipped for side, found in first.items()})
    blocks = {side: [x[positions[side]] for x in cache.block_features(cfg.cache_dir, found.key, cfg.study_pool)]
              for side, found in first.items()}
    final = {side: cache.embeddings(m, dataset, -1, "embed", cfg.cache_dir, how).values[positions[side]]
             for side, m in models.items()}
    if len(kept) < len(dataset):  # unreadable images (dataset.on_error=skip): both models' features of the rest
        cache.say_skipped(tracker, dataset, tuple(np.setdiff1d(np.arange(len(dataset)), kept).tolist()), log)
        dataset, labels = dataset.select(kept), labels[kept]
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
        last = evaluated  # the final block's, for the per-class differences below
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
    # Which classes fine-tuning helped or hurt at the final block: paired per-class differences.
    by_class = audit.per_class_differences(labels, names, last["finetuned"], last["base"], halves.scale, confidence)
    if not by_class.empty:
        by_class.to_csv(tracker.path("tables/per_class_differences.csv"), index=False)
        moved = by_class[by_class["p_holm"] < 0.05]
        log.info("per class, fine-tuned minus base at the final block (Holm p < 0.05): %s", ", ".join(
            f"{r['class']} {r['metric']} {r['difference']:+.3f}" for _, r in moved.iterrows()) or "none")
    overlap = np.asarray(overlap, dtype=np.float32)  # (blocks, N): share of k nearest neighbours kept

    coords = _aligned_maps(final, distance, seed, labels)
    indices = data.column(dataset, "index")
    tracker.save_arrays({**{f"coords_{side}": values for side, values in coords.items()},
                         "labels": labels, "indices": indices,
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
    if cfg.plots.enabled:  # the static figures (compare.html and report.html are written either way)
        _draw_figures(cfg, tracker, dataset, table, coords, labels, names, indices, overlap[-1], record,
                      models["base"].name, min(k, len(dataset) - 2))
    tracker.path("compare.html").write_text(_linked_page(
        cfg, dataset, coords, last, overlap[-1], rows[-1], panel, metric_names, labels, names, confidence,
        record, Path(str(cfg.finetuned)).name, Path(models["base"].name).name, min(k, len(dataset) - 2)),
        encoding="utf-8")
    _write_study_report(tracker, table, metric_names, cfg.finetuned, models["base"].name, len(dataset))
    return scores


def _draw_figures(cfg: DictConfig, tracker: Tracker, dataset, table, coords: dict, labels: np.ndarray,
                  names: list[str], indices, kept: np.ndarray, record: dict, base: str, k: int) -> None:
    """The study's figures (plots/*.png): by depth, the aligned maps, the neighbourhood change and the
    images whose final-block neighbours changed most."""
    from latentmap.figures import thumbnail_arrays

    changed = np.argsort(kept, kind="stable")[: int(cfg.plots.grid_images)]
    figures = finetune_plots.study_figures(table, coords, labels, names, base, kept)
    figures["most_changed"] = plots.sample_grid(
        thumbnail_arrays(dataset, changed, **data.reading_of(OmegaConf.create(record["dataset"]))),
        [f"{plots.shortened(names[labels[r]], plots.NAME_CHARACTERS['caption'])} #{indices[r]}\n"
         f"kept {kept[r]:.0%}" for r in changed],
        f"the images whose {k} nearest neighbours changed most (final block)")
    for name, figure in figures.items():
        figure.savefig(tracker.path(f"plots/{name}.png"), dpi=120)


def _linked_page(cfg: DictConfig, dataset, coords: dict[str, np.ndarray], last: dict, kept: np.ndarray, row: dict,
                 panel: dict, metric_names: list[str], labels: np.ndarray, names: list[str], confidence: float,
                 record: dict, finetuned: str, base: str, k: int) -> str:
    """compare.html for the study: A the fine-tuned model, B the base, on their aligned UMAP maps of
    the final embedding; coloured by the final block's k-NN outcome and the neighbours kept; beside
    the final block's paired differences (A - B: fine-tuned minus base, Holm over its metrics) and
    similarity panel."""
    import pandas as pd

    from latentmap import linked
    from latentmap.figures import thumbnail_arrays

    maps = linked.aligned([linked.Map(f"fine-tuned {finetuned}", coords["aligned_umap_finetuned"]),
                           linked.Map(f"base {base}", coords["aligned_umap_base"])], already=True)
    columns = [linked.Column("k-NN right or wrong at the final block, A vs B", "outcome",
                             linked.outcome(last["finetuned"].per_image["knn_acc_hd"],
                                            last["base"].per_image["knn_acc_hd"])),
               linked.Column(f"{k} nearest neighbours kept at the final block, A vs B", "share", kept)]
    table = pd.DataFrame([{"metric": m, "a": row[f"{m}_finetuned"], "b": row[f"{m}_base"],
                           "difference": row[f"delta_{m}"], "lo": row[f"delta_{m}_lo"], "hi": row[f"delta_{m}_hi"],
                           "p_value": row[f"delta_{m}_p"]} for m in metric_names])
    table["p_holm"] = stats.adjust(table["p_value"].to_numpy(), "holm")
    numbers = linked.numbers_html(("A", "B"), ("fine-tuned", "base"), table, panel, confidence)
    reading = data.reading_of(OmegaConf.create(record["dataset"]))
    return linked.with_thumbnails(
        maps, labels, names, data.column(dataset, "index"), columns, numbers,
        f"fine-tuned {finetuned} against base {base}: the final block", "The maps are the final embedding's, "
        "fitted together (aligned UMAP); the colours and tables are the final block's, on the held-out images.",
        lambda rows: thumbnail_arrays(dataset, rows, size=48, **reading), int(record["seed"]),
        float(cfg.plots.map_max_mb), int(cfg.plots.map_thumbnails))


def _write_study_report(tracker: Tracker, table, metric_names: list[str], finetuned: str, base_name: str,
                        n_images: int) -> None:
    """``report.html``: the fine-tuning study on one self-contained page (:mod:`latentmap.report`)."""
    from latentmap import report

    deltas = [f"delta_{m}" for m in metric_names]
    sections = [
        ("Per block: fine-tuned minus base", "The paired difference of each metric over the same held-out "
         "images on the same half-samples with its interval, and under it its p-value (Student's t over the "
         "half-samples) and the p-value adjusted by Benjamini-Hochberg (BH) over every block x metric of this "
         "table (one family); grey: adjusted p >= 0.05.", report.block_table(table, deltas)),
        ("Per block: how alike base and fine-tuned are", "Each measure of the similarity panel with its bootstrap "
         "interval, and under it the permutation p-value (rows of one side shuffled) and that adjusted by "
         "Benjamini-Hochberg (BH) over every block x measure (one family); grey: adjusted p >= 0.05; Procrustes "
         "is a distance.",
         report.block_table(table, list(measures.PANEL))),
    ]
    figures = {name: path for name in ("finetune_depth", "finetune_maps", "neighbourhood_change", "most_changed")
               if (path := tracker.artifact_dir / "plots" / f"{name}.png").is_file()}  # none: plots.enabled=false
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
    with reduce.seeded_umap(), jit.cached_runtime_jit():  # its layout's epoch function from numba's disk cache
        aligned = AlignedUMAP(n_neighbors=min(15, n - 1), random_state=seed, n_epochs=200).fit(
            [spaces["base"], spaces["finetuned"]], relations=[{i: i for i in range(n)}])
    pca = {side: PCA(2, random_state=seed).fit_transform(values) for side, values in spaces.items()}
    return {"aligned_umap_base": aligned.embeddings_[0].astype(np.float32),
            "aligned_umap_finetuned": aligned.embeddings_[1].astype(np.float32),
            "pca_base": pca["base"].astype(np.float32),
            "pca_finetuned": pca["finetuned"].astype(np.float32),
            "pca_finetuned_aligned": procrustes_align(pca["finetuned"], pca["base"]).astype(np.float32)}
