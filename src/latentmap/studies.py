"""Layer studies: the summary of a set of finished runs (a multirun's children, or any selection).

From the runs' params, tags and metrics (as ``mlflow.search_runs`` returns them, a pandas
DataFrame) it builds:

* ``summary.csv``: one row per run, its params, depth tags and metrics;
* ``plots/depth_<metric>.png``: each metric against relative depth (0 = first block,
  1 = last), one line per (model, pool, reducer), so models of different depth share an axis;
* ``plots/cka_<model>_<pool>.png`` and ``tables/cka_<model>_<pool>.csv``: per model, the
  layer x layer linear CKA of its blocks on the run's images (from the embedding cache), next to
  the silhouette and k-NN accuracy of each layer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import ScaledTranslation

from latentmap import cache, compare
from latentmap.metrics import LABEL_METRICS, NEIGHBOUR_METRICS, PROBE_METRICS
from latentmap.plots import class_colors
from latentmap.stats import GEOMETRY_METRICS

log = logging.getLogger(__name__)

METRICS = NEIGHBOUR_METRICS + LABEL_METRICS + PROBE_METRICS + GEOMETRY_METRICS
# Params that say where a feature sits or how a run was executed, not what it measured: never a reason
# to draw two lines. Every other param that differs among the runs separates their lines.
_NOT_A_GROUP = ("params.layer", "params.device", "params.batch_size", "params.num_workers", "params.output_dir",
                "params.cache_dir", "params.resume", "params.optimized_metric", "params.tracking.")


def group_keys(runs: pd.DataFrame) -> list[str]:
    """The params that differ among ``runs`` except the layer (and settings that change no result):
    dataset, seeds, model, pool, reducer, ... Each combination of their values is one line."""
    keys = []
    for column in sorted(c for c in runs.columns if c.startswith("params.")):
        if column.startswith(_NOT_A_GROUP):
            continue
        if runs[column].astype(str).nunique(dropna=False) > 1:
            keys.append(column)
    return keys


@dataclass
class Summary:
    table: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One tidy row per run: run_id, model, pool, reducer, layer_index, relative_depth, metrics, params."""
    if runs.empty:
        return pd.DataFrame()
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "model": runs.get("params.model.name"),
        "pool": runs.get("params.pool"),
        "reducer": runs.get("params.reducer._target_", pd.Series(dtype=str)).astype(str).str.rsplit(".", n=1).str[-1],
        "layer_index": pd.to_numeric(runs.get("tags.layer_index"), errors="coerce"),
        "num_layers": pd.to_numeric(runs.get("tags.num_layers"), errors="coerce"),
        "relative_depth": pd.to_numeric(runs.get("tags.relative_depth"), errors="coerce"),
        "cache_key": runs.get("tags.cache_key"),
        "cache_dir": runs.get("tags.cache_dir"),
        "status": runs.get("status"),
    })
    for metric in METRICS:
        for suffix in ("", "_lo", "_hi"):
            table[metric + suffix] = runs.get(f"metrics.{metric}{suffix}", np.nan)
    keys = group_keys(runs)
    table["group"] = [" · ".join(f"{key[len('params.'):]}={_short(value)}" for key, value in zip(keys, row))
                      for row in (runs[keys].astype(str).itertuples(index=False) if keys else [()] * len(runs))]
    params = runs[sorted(c for c in runs.columns if c.startswith("params."))]
    table = pd.concat([table.reset_index(drop=True), params.reset_index(drop=True)], axis=1)
    return table.sort_values(["group", "model", "pool", "reducer", "layer_index"],
                             na_position="last").reset_index(drop=True)


def _short(value: str) -> str:
    """A param value as a line label: a number as it is, a path's last part, a dotted class's name."""
    value = str(value)
    try:
        float(value)
        return value  # a number: as it is
    except ValueError:
        pass
    if "/" in value:  # a path or a hub id: its last part, dots and all
        return Path(value).name or value
    return value.rsplit(".", 1)[-1]  # a dotted class name: the class


def depth_figure(table: pd.DataFrame, metric: str) -> Figure:
    """``metric`` against relative depth, one line per group of runs that differ only in their layer,
    with its confidence band (``<metric>_lo`` .. ``<metric>_hi``) where the runs logged one. Lines
    that coincide (the embedding-space metrics of two reducers) stay visible: each line has its own
    marker, is drawn a little thinner than the one before, and is drawn 2.5 points to the side of
    the one before (on screen only: the plotted data are the exact depths)."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    groups = list(table.groupby("group", dropna=False, sort=True))
    colours = class_colors(max(len(groups), 1))
    markers = "osD^vP*Xph"
    for i, (colour, (label, rows)) in enumerate(zip(colours, groups)):
        rows = rows.dropna(subset=["relative_depth", metric]).sort_values("relative_depth")
        if rows.empty:
            continue
        # Drawn a few points to the side (the data stay exact): coinciding lines stay apart.
        shifted = ax.transData + ScaledTranslation((i - (len(groups) - 1) / 2) * 2.5 / 72, 0, fig.dpi_scale_trans)
        if rows[f"{metric}_lo"].notna().all() and rows[f"{metric}_hi"].notna().all():
            ax.fill_between(rows["relative_depth"], rows[f"{metric}_lo"], rows[f"{metric}_hi"], color=colour,
                            alpha=0.15, linewidth=0, transform=shifted)
        ax.plot(rows["relative_depth"], rows[metric], marker=markers[i % len(markers)], color=colour,
                linewidth=max(0.8, 2.2 - 0.3 * i), markersize=max(3.5, 7 - i), label=str(label) or "all runs",
                transform=shifted)
    ax.set_xlabel("relative depth (0 = first block, 1 = last)")
    ax.set_ylabel(metric)
    ax.set_xlim(-0.03, 1.03)
    ax.set_title(f"{metric} by depth" + (" (bands: confidence intervals)" if table[f"{metric}_lo"].notna().any()
                                          else ""))
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8, loc="best")
    return fig


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name or str(text)).strip("_")[:60]


def cka_figure(matrix: np.ndarray, model: str, pool: str, per_layer: pd.DataFrame) -> Figure:
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


def summarize(runs: pd.DataFrame, max_cka_images: int = 2000, seed: int = 0) -> Summary:
    """The whole summary of ``runs`` (a ``mlflow.search_runs`` DataFrame)."""
    table = runs_table(runs)
    summary = Summary(table=table)
    if table.empty:
        return summary
    depth_varies = table.groupby("group", dropna=False)["relative_depth"].nunique().max() > 1
    for metric in METRICS if depth_varies else ():  # no depth plot for a sweep at one depth
        if table[metric].notna().any():
            summary.figures[f"depth_{metric}"] = depth_figure(table, metric)
    block_rows = table[table["pool"].isin(["cls", "mean"]) & table["cache_key"].notna()]
    for (model, pool), rows in block_rows.groupby(["model", "pool"]):
        first = rows.iloc[0]
        try:
            layers = cache.block_features(first["cache_dir"], first["cache_key"], pool)
        except (FileNotFoundError, TypeError, OSError) as error:
            log.warning("no CKA for %s (%s): %s", model, pool, error)
            continue
        rows_kept = compare.subsample_rows(len(layers[0]), max_cka_images, seed)
        if len(rows_kept) < len(layers[0]):
            log.info("CKA for %s on a seeded subsample of %d of %d images", model, len(rows_kept), len(layers[0]))
        matrix = compare.cka_matrix([layer[rows_kept] for layer in layers])
        name = f"cka_{_slug(model)}_{pool}"
        per_layer = rows.groupby("layer_index", as_index=False)[["silhouette_hd", "knn_acc_hd"]].mean()
        summary.figures[name] = cka_figure(matrix, model, pool, per_layer)
        summary.tables[name] = pd.DataFrame(matrix, index=range(len(matrix)), columns=range(len(matrix)))
    return summary


def write(summary: Summary, folder: Path) -> Path:
    """Write ``summary.csv``, ``plots/`` and ``tables/`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary.table.to_csv(folder / "summary.csv", index=False)
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "tables").mkdir(exist_ok=True)
    for name, figure in summary.figures.items():
        figure.savefig(folder / "plots" / f"{name}.png", dpi=120)
    for name, frame in summary.tables.items():
        frame.to_csv(folder / "tables" / f"{name}.csv")
    return folder


def child_runs(client, parent_run_id: str) -> pd.DataFrame:
    """The children of a parent run, as a ``mlflow.search_runs`` DataFrame."""
    import mlflow

    experiment_id = client.get_run(parent_run_id).info.experiment_id
    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=50000)


def log_summary(client, run_id: str, folder: Path, runs: pd.DataFrame | None = None,
                max_cka_images: int = 2000) -> Path:
    """Summarize ``runs`` (default: the children of ``run_id``) into ``folder`` and log it to ``run_id``.

    The multirun parent callback calls this when a sweep ends (``conf/hydra/default.yaml`` names it),
    and ``scripts/report.py`` for any selection of runs.
    """
    if runs is None:
        runs = child_runs(client, run_id)
    finished = runs[runs["status"] == "FINISHED"] if not runs.empty else runs
    summary = summarize(finished, max_cka_images=max_cka_images)
    if summary.table.empty:
        log.info("no finished runs to summarize for %s", run_id)
        return folder
    write(summary, folder)
    client.log_artifacts(run_id, str(folder))
    log.info("summary of %d runs logged to run %s", len(summary.table), run_id)
    return folder
