"""The fine-tuning study's figures: how much each block changed, the aligned maps, and how much each
image's neighbourhood changed (arrays and tables in, Figures out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from latentmap.plots import as_written, class_colors


@as_written
def study_figures(table, coords, labels, names, base_name: str, overlap) -> dict[str, Any]:
    """``finetune_depth`` (similarity and paired differences by depth), ``finetune_maps`` (the four
    aligned maps) and ``neighbourhood_change`` (the base map coloured by neighbours kept)."""
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
    colours = class_colors(len(names))
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
