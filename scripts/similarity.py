"""Cross-model CKA: every (block i of model A, block j of model B) on the same images.

    python scripts/similarity.py model@model_a=vit model@model_b=resnet dataset=cifar10
    python scripts/similarity.py model@model_a=hf model_a.name=<dir> model@model_b=timm \\
        model_b.name=resnet18 pool_a=cls kind=debiased dataset.limit=1000

Features come from the embedding cache (one extraction per model, shared with run.py). The
heatmap (plots/cka.png) and the matrix (tables/cka.csv, arrays/cka.npy) go to one MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from latentmap import cache, compare
from latentmap.config import instantiate_node
from latentmap.errors import require_int
from latentmap.task import execute, tracked_task
from latentmap.tracking import Tracker

log = logging.getLogger("latentmap.similarity")


def cka_heatmap(matrix: np.ndarray, name_a: str, name_b: str, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="CKA")
    ax.set_ylabel(f"{name_a} block")
    ax.set_xlabel(f"{name_b} block")
    ax.set_title(title)
    return fig


@tracked_task
def similarity(cfg: DictConfig, tracker: Tracker) -> dict[str, float]:
    """The (blocks of A, blocks of B) CKA matrix, logged as one run; returns its corner values."""
    require_int("max_images", cfg.max_images, 4, "max_images=2000")
    dataset = instantiate_node(cfg.dataset, "dataset").load(seed=int(cfg.seed))
    blocks = {}
    for side in ("a", "b"):
        backbone = instantiate_node(cfg[f"model_{side}"], f"model_{side}")
        blocks[side] = (backbone.name, cache.all_blocks(
            backbone, dataset, cfg[f"pool_{side}"], cfg.cache_dir, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, device=cfg.device, precision=cfg.precision))
    rows = compare.subsample_rows(len(dataset), int(cfg.max_images), int(cfg.seed))
    if len(rows) < len(dataset):
        log.info("CKA on a seeded subsample of %d of %d images", len(rows), len(dataset))
    (name_a, layers_a), (name_b, layers_b) = blocks["a"], blocks["b"]
    matrix = compare.cka_matrix([x[rows] for x in layers_a], [y[rows] for y in layers_b], kind=cfg.kind)
    np.save(tracker.path("arrays/cka.npy"), matrix, allow_pickle=False)
    import pandas as pd

    pd.DataFrame(matrix).to_csv(tracker.path("tables/cka.csv"), index_label=f"{Path(name_a).name} block")
    title = f"{cfg.kind} CKA · {Path(name_a).name} ({cfg.pool_a}) vs {Path(name_b).name} ({cfg.pool_b})"
    cka_heatmap(matrix, Path(name_a).name, Path(name_b).name, title).savefig(tracker.path("plots/cka.png"), dpi=120)
    tracker.set_tags({"latentmap.role": "similarity", "n_images": str(len(rows))})
    scores = {"cka_first_blocks": float(matrix[0, 0]), "cka_last_blocks": float(matrix[-1, -1])}
    tracker.log_metrics(scores)
    return scores


@hydra.main(version_base="1.3", config_path="../conf", config_name="similarity")
def main(cfg: DictConfig) -> None:
    execute(similarity, cfg)


if __name__ == "__main__":
    main()
