"""Cross-model CKA: every (block i of model A, block j of model B) on the same images.

    python scripts/similarity.py model@model_a=vit model@model_b=resnet dataset=cifar10
    python scripts/similarity.py model@model_a=hf model_a.name=<dir> model@model_b=timm \\
        model_b.name=resnet18 pool_a=cls kind=debiased dataset.limit=1000

Features come from the embedding cache (one extraction per model, shared with run.py). The
heatmap (plots/cka.png) and the matrix (tables/cka.csv, arrays/cka.npy), every measure of the
similarity panel block x block (tables/panel_<measure>.csv), and the final blocks' panel with its
permutation nulls and bootstrap intervals (tables/panel_final.csv, metrics final_<measure> with
_lo, _hi, _p) go to one MLflow run.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from latentmap import cache, measures, stats
from latentmap.config import CONF_DIR, instantiate_node
from latentmap.extract import Extraction
from latentmap.plots import studies as study_plots
from latentmap.task import execute, tracked_task
from latentmap.tracking import Tracker

log = logging.getLogger("latentmap.similarity")


@contextmanager
def _keys_of(side: str) -> Iterator[None]:
    """A model's errors name its keys as run.py spells them (``model.name=``, ``pool=``): here they
    are ``model_a.name=`` and ``pool_a=`` (or b's), which is what the user typed and must change.
    A block pooling's alternatives leave out ``embed``, which run.py has and pool_a does not (the
    fix said ``use pool_a=mean or pool_a=embed``, then refused embed)."""
    from latentmap.errors import ConfigError, rename_keys

    try:
        yield
    except ConfigError as error:
        message = rename_keys(str(error), {"model.": f"model_{side}.", "pool=": f"pool_{side}="})
        raise ConfigError(message.replace(f" or pool_{side}=embed", "")) from error


def _prepare(cfg: DictConfig):
    """(the two backbones, the dataset), before any run is created (every setting was checked by
    tracked_task): both models must have blocks to compare."""
    from latentmap.errors import ConfigError

    backbones = {}
    for side in ("a", "b"):
        with _keys_of(side):
            backbones[side] = backbone = instantiate_node(cfg[f"model_{side}"], f"model_{side}")
        if not backbone.BLOCKS:
            raise ConfigError(f"model_{side} ({backbone.name}) has no blocks: similarity.py compares two models "
                              f"block by block; choose a transformers or timm backbone for model@model_{side}")
    dataset = instantiate_node(cfg.dataset, "dataset").load(seed=int(cfg.seed))
    if len(dataset) < MIN_IMAGES:
        limit = cfg.dataset.get("limit")
        raise ConfigError(f"similarity.py compares two models on at least {MIN_IMAGES} images (debiased CKA needs 4, "
                          f"the permutation nulls and the k-NN overlap more); the dataset has {len(dataset)}"
                          + (f" (dataset.limit={limit})" if limit is not None else "")
                          + f": use more images, e.g. dataset.limit={max(200, MIN_IMAGES)}")
    return backbones, dataset


MIN_IMAGES = 10  # below, every measure's null and interval rest on a handful of images


@tracked_task(prepare=_prepare, role="similarity",
              describe=lambda cfg: f"similarity · {Path(str(cfg.model_a.get('name'))).name} vs "
                                   f"{Path(str(cfg.model_b.get('name'))).name}")
def similarity(cfg: DictConfig, tracker: Tracker, prepared) -> dict[str, float]:
    """The (blocks of A, blocks of B) CKA matrix and similarity panel, and the final blocks' panel with
    its nulls and intervals, logged as one run; returns its corner values."""
    backbones, dataset = prepared
    first = {}
    for side, backbone in backbones.items():
        with _keys_of(side):
            first[side] = cache.embeddings(backbone, dataset, 0, cfg[f"pool_{side}"], cfg.cache_dir, Extraction.of(cfg))
    kept, positions = cache.common_rows(len(dataset), {side: found.skipped for side, found in first.items()})
    if len(kept) < len(dataset):  # unreadable images (dataset.on_error=skip): both models' features of the rest
        if len(kept) < MIN_IMAGES:
            from latentmap.errors import ConfigError

            raise ConfigError(f"only {len(kept)} of the {len(dataset)} images could be read (dataset.on_error=skip "
                              f"left the rest out): similarity.py compares two models on at least {MIN_IMAGES}")
        cache.say_skipped(tracker, dataset, tuple(np.setdiff1d(np.arange(len(dataset)), kept).tolist()), log)
        dataset = dataset.select(kept)
    blocks = {side: (backbone.name, [x[positions[side]] for x in cache.block_features(
        cfg.cache_dir, first[side].key, cfg[f"pool_{side}"])]) for side, backbone in backbones.items()}
    rows = measures.subsample_rows(len(dataset), int(cfg.max_images), int(cfg.seed))
    if len(rows) < len(dataset):
        log.info("CKA on a seeded subsample of %d of %d images", len(rows), len(dataset))
    (name_a, layers_a), (name_b, layers_b) = blocks["a"], blocks["b"]
    matrix = measures.cka_matrix([x[rows] for x in layers_a], [y[rows] for y in layers_b], kind=cfg.kind)
    np.save(tracker.path("arrays/cka.npy"), matrix, allow_pickle=False)
    import pandas as pd

    pd.DataFrame(matrix).to_csv(tracker.path("tables/cka.csv"), index_label=f"{Path(name_a).name} block")
    title = f"{cfg.kind} CKA · {Path(name_a).name} ({cfg.pool_a}) vs {Path(name_b).name} ({cfg.pool_b})"
    figure = study_plots.cka_heatmap(matrix, Path(name_a).name, Path(name_b).name, title)
    figure.savefig(tracker.path("plots/cka.png"), dpi=120)
    tracker.set_tags({"latentmap.role": "similarity", "n_images": str(len(rows))})
    named = "cka" if cfg.kind == "linear" else f"cka_{cfg.kind}"  # kind=debiased: not read as final_cka's linear one
    scores = {f"{named}_first_blocks": float(matrix[0, 0]), f"{named}_last_blocks": float(matrix[-1, -1])}
    # The similarity panel, block x block, and the final blocks with their nulls and intervals.
    null_rows = measures.subsample_rows(len(dataset), int(cfg.null_images), int(cfg.seed) + 1)
    k = min(int(cfg.k), max(1, min(len(rows), len(null_rows)) // 4))
    for measure, values in measures.panel_matrices_between([x[rows] for x in layers_a], [y[rows] for y in layers_b],
                                                          k).items():
        pd.DataFrame(values).to_csv(tracker.path(f"tables/panel_{measure}.csv"),
                                    index_label=f"{Path(name_a).name} block")
    final = measures.panel(layers_a[-1][null_rows], layers_b[-1][null_rows], k, int(cfg.permutations),
                          int(cfg.bootstrap), seed=int(cfg.seed))
    final_table = pd.DataFrame([vars(result) for result in final.values()])
    # One family: the five measures' tests of the final blocks, Holm adjusted.
    final_table["p_holm"] = stats.adjust(final_table["p_value"].to_numpy(), "holm")
    final_table.to_csv(tracker.path("tables/panel_final.csv"), index=False)
    for measure, result in final.items():
        scores[f"final_{measure}"] = result.value
        tracker.log_metrics({f"final_{measure}_{key}": value for key, value in
                             (("lo", result.lo), ("hi", result.hi), ("p", result.p_value)) if not np.isnan(value)})
    tracker.log_metrics(scores)
    return scores


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="similarity")
def main(cfg: DictConfig) -> None:
    execute(similarity, cfg)


def cli() -> None:
    """The installed ``latentmap-similarity`` command (and ``python scripts/similarity.py``)."""
    from latentmap.config import hydra_command

    hydra_command(main, "similarity", "scripts/similarity.py")


if __name__ == "__main__":
    cli()
