"""The studies' figures (arrays and tables in, a Figure out): a metric by depth, the layer x layer
CKA and similarity panel of a model's blocks, and the CKA matrix of two models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation

from latentmap import measures
from latentmap.plots import as_written, class_colors, legend_below, legend_height


@as_written
def depth(lines: list[tuple[str, pd.DataFrame]], metric: str) -> Figure:
    """``metric`` against relative depth, one line per group of runs that differ only in their layer,
    with its confidence band (``<metric>_lo`` .. ``<metric>_hi``) where the runs logged one. Lines
    that coincide (the embedding-space metrics of two reducers) stay visible: each line has its own
    marker, is drawn a little thinner than the one before, and is drawn 2.5 points (at most 15 points
    over all lines) to the side of the one before (on screen only: the plotted data are the exact
    depths). ``lines``: (label, that line's runs with ``relative_depth``, ``metric`` and its bounds),
    in the legend's order."""
    labels = [name for name, _ in lines]
    groups = lines
    below, _ = legend_height(labels if len(groups) > 1 else [], 6.4)
    fig = Figure(figsize=(6.4, 4.2 + below), layout="constrained")
    ax = fig.add_subplot()
    colours = class_colors(max(len(groups), 1))
    markers = "osD^vP*Xph"
    for i, (colour, (_, rows)) in enumerate(zip(colours, groups)):
        rows = rows.dropna(subset=["relative_depth", metric]).sort_values("relative_depth")
        if rows.empty:
            continue
        # Drawn a few points to the side (the data stay exact): coinciding lines stay apart.
        step = min(2.5, 15 / max(len(groups), 1))  # points; many lines spread at most +-7.5 points
        shifted = ax.transData + ScaledTranslation((i - (len(groups) - 1) / 2) * step / 72, 0, fig.dpi_scale_trans)
        if rows[f"{metric}_lo"].notna().all() and rows[f"{metric}_hi"].notna().all():
            ax.fill_between(rows["relative_depth"], rows[f"{metric}_lo"], rows[f"{metric}_hi"], color=colour,
                            alpha=0.15, linewidth=0, transform=shifted)
        ax.plot(rows["relative_depth"], rows[metric], marker=markers[i % len(markers)], color=colour,
                linewidth=max(0.8, 2.2 - 0.3 * i), markersize=max(3.5, 7 - i),
                label=labels[i], transform=shifted)
        # Artists drawn with a shifted transform do not enter autoscaling: add their data by hand.
        ax.update_datalim(np.column_stack([rows["relative_depth"], rows[metric]]))
        for side in ("lo", "hi"):
            if rows[f"{metric}_{side}"].notna().all():
                ax.update_datalim(np.column_stack([rows["relative_depth"], rows[f"{metric}_{side}"]]))
    ax.autoscale_view()
    ax.set_xlabel("relative depth (0 = first block, 1 = last)")
    ax.set_ylabel(metric)
    ax.set_xlim(-0.03, 1.03)
    banded = any(rows[f"{metric}_lo"].notna().any() for _, rows in lines)
    ax.set_title(f"{metric} by depth" + (" (bands: confidence intervals)" if banded else ""))
    ax.grid(alpha=0.3)
    if len(groups) > 1:  # one line needs no legend: the title says what it is
        legend_below(fig, ax)
    return fig


@as_written
def cka(matrix: np.ndarray, model: str, pool: str, per_layer: pd.DataFrame) -> Figure:
    """Layer x layer CKA heatmap beside the silhouette and k-NN accuracy of each layer."""
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    heat, curve = fig.subplots(1, 2, width_ratios=[1.1, 1])
    image = heat.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="lower")
    fig.colorbar(image, ax=heat, label="linear CKA", shrink=0.85)
    heat.set_xlabel("block")
    heat.set_ylabel("block")
    heat.set_title(f"{Path(str(model)).name} · {pool}: CKA between blocks")
    for metric in ("silhouette_hd", "knn_acc_hd"):
        rows = per_layer.dropna(subset=[metric])
        if not rows.empty:
            curve.plot(rows["layer_index"], rows[metric], marker="o", label=metric)
    if len(matrix) > 1:
        curve.plot(range(len(matrix)), matrix[:, -1], marker="s", linestyle="--", label="CKA with last block")
    curve.set_xlabel("block")
    curve.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
    heat.xaxis.set_major_locator(MaxNLocator(integer=True))
    heat.yaxis.set_major_locator(MaxNLocator(integer=True))
    curve.set_title("per-layer quality")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    return fig


_PANEL_TITLES = {"cka": "linear CKA (biased)", "cka_debiased": "debiased CKA", "mutual_knn": "mutual k-NN",
                 "rsa": "RSA (Spearman of RDMs)", "procrustes": "Procrustes distance (angle)"}


@as_written
def panel(matrices: dict[str, np.ndarray], to_last: pd.DataFrame, model: str, pool: str, n: int) -> Figure:
    """Five block x block heatmaps (biased and debiased CKA side by side) and, last, each block's
    similarity with the final block by depth: intervals as bands, the permutation null's 95th
    percentile dashed, hollow markers where the similarity is not above the null (Benjamini-Hochberg
    adjusted p >= 0.05 over the blocks x measures)."""
    fig = Figure(figsize=(16, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (measure, matrix) in zip(axes.flat, matrices.items()):
        distance = measure in measures.LOWER_IS_CLOSER
        image = ax.imshow(matrix, origin="lower", cmap="magma_r" if distance else "magma",
                          vmin=0, vmax=np.pi / 2 if distance else 1)
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(_PANEL_TITLES[measure] + (" (lower: closer)" if distance else ""), fontsize=10)
        ax.set_xlabel("block")
        ax.set_ylabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes.flat[-1]
    colours = class_colors(3)
    for colour, measure in zip(colours, ("cka_debiased", "mutual_knn", "rsa")):
        rows = to_last[to_last["measure"] == measure].sort_values("block")
        ax.fill_between(rows["block"], rows["lo"], rows["hi"], color=colour, alpha=0.2, linewidth=0)
        ax.plot(rows["block"], rows["null_edge"], color=colour, linestyle="--", linewidth=1)
        significant = rows["p_adjusted"] < 0.05
        ax.plot(rows["block"], rows["value"], color=colour, label=_PANEL_TITLES[measure])
        ax.scatter(rows["block"][significant], rows["value"][significant], color=colour, s=22, zorder=3)
        ax.scatter(rows["block"][~significant], rows["value"][~significant], facecolors="white", edgecolors=colour,
                   s=22, zorder=3)
    ax.set_xlabel("block")
    ax.set_ylabel("similarity with the final block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("with the final block (bands: 95% intervals)\ndashed: null 95th pct.; hollow: BH-adjusted p >= 0.05",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(str(model)).name} · {pool}: similarity panel on {n} images "
                 "(studies report debiased CKA; biased CKA is inflated at small N)")
    return fig


@as_written
def cka_heatmap(matrix: np.ndarray, name_a: str, name_b: str, title: str) -> Figure:
    """The (blocks of A, blocks of B) CKA matrix of two models (scripts/similarity.py)."""
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, origin="lower", cmap="magma", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="CKA")
    ax.set_ylabel(f"{name_a} block")
    ax.set_xlabel(f"{name_b} block")
    ax.set_title(title)
    return fig
