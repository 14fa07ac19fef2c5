"""Layer studies: the summary of a set of finished runs (a multirun's children, or any selection).

From the runs' params, tags and metrics (as ``mlflow.search_runs`` returns them, a pandas
DataFrame) it builds:

* ``summary.csv``: one row per run, its params, depth tags and metrics;
* ``plots/depth_<metric>.png``: each metric against relative depth (0 = first block,
  1 = last), one line per (model, pool, reducer), so models of different depth share an axis;
* ``plots/cka_<model>_<pool>.png`` and ``tables/cka_<model>_<pool>.csv``: per model, the
  layer x layer linear CKA of its blocks on the run's images (from the embedding cache), next to
  the silhouette and k-NN accuracy of each layer;
* ``plots/panel_<model>_<pool>.png``, ``tables/panel_<model>_<pool>_<measure>.csv`` and
  ``tables/to_last_<model>_<pool>.csv``: the similarity panel of :mod:`latentmap.compare` block x
  block (biased and debiased CKA, mutual k-NN, RSA, Procrustes), and every block against the final
  block with its permutation null and bootstrap interval (``study.*`` settings).
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

from latentmap import cache, compare, stats
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
        "run_name": runs.get("tags.mlflow.runName"),
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
                linewidth=max(0.8, 2.2 - 0.3 * i), markersize=max(3.5, 7 - i),
                label=str(label) if isinstance(label, str) and label else "all runs", transform=shifted)
        # Artists drawn with a shifted transform do not enter autoscaling: add their data by hand.
        ax.update_datalim(np.column_stack([rows["relative_depth"], rows[metric]]))
        for side in ("lo", "hi"):
            if rows[f"{metric}_{side}"].notna().all():
                ax.update_datalim(np.column_stack([rows["relative_depth"], rows[f"{metric}_{side}"]]))
    ax.autoscale_view()
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
        _similarity_panel(summary, layers, model, pool, _settings(rows), seed)
    return summary


@dataclass(frozen=True)
class PanelSettings:
    """``study.*`` of the runs' config: how many images the layer x layer panel and the nulls use."""

    max_images: int = 1000
    null_images: int = 500
    permutations: int = 200
    bootstrap: int = 100
    k: int = 10


def _settings(rows: pd.DataFrame) -> PanelSettings:
    """The runs' own ``study.*`` params (every run logs its config), else the defaults."""
    found = {}
    for key in PanelSettings.__dataclass_fields__:
        column = f"params.study.{key}"
        if column in rows and rows[column].notna().any():
            found[key] = int(float(rows[column].dropna().iloc[0]))
    return PanelSettings(**found)


def _similarity_panel(summary: Summary, layers: list[np.ndarray], model: str, pool: str,
                      settings: PanelSettings, seed: int) -> None:
    """The panel of a model's blocks: every measure block x block (``panel_<model>_<pool>_<measure>``
    tables), and each block against the final block with its permutation null and interval
    (``to_last_<model>_<pool>``), drawn together (``plots/panel_<model>_<pool>.png``)."""
    n = len(layers[0])
    rows = compare.subsample_rows(n, settings.max_images, seed)
    null_rows = compare.subsample_rows(n, settings.null_images, seed + 1)
    k = min(settings.k, max(1, min(len(rows), len(null_rows)) // 4))  # k < N on the smaller sample
    matrices = compare.panel_matrices([layer[rows] for layer in layers], k)
    slug = f"{_slug(model)}_{pool}"
    for measure, matrix in matrices.items():
        summary.tables[f"panel_{slug}_{measure}"] = pd.DataFrame(matrix)
    log.info("similarity panel of %s (%s): %d blocks on %d images; nulls (%d permutations) and intervals "
             "(%d resamples) against the final block on %d images", model, pool, len(layers), len(rows),
             settings.permutations, settings.bootstrap, len(null_rows))
    last = layers[-1][null_rows]
    to_last = []
    for block, layer in enumerate(layers):
        found = compare.panel(layer[null_rows], last, k, settings.permutations, settings.bootstrap, seed=seed + block)
        to_last += [{"block": block, **vars(result)} for result in found.values()]
    table = pd.DataFrame(to_last)
    # One family: every block x measure test of this model and pool, Benjamini-Hochberg adjusted.
    table["p_adjusted"] = stats.adjust(table["p_value"].to_numpy(), "bh")
    summary.tables[f"to_last_{slug}"] = table
    summary.figures[f"panel_{slug}"] = panel_figure(matrices, table, model, pool, len(rows))


_PANEL_TITLES = {"cka": "linear CKA (biased)", "cka_debiased": "debiased CKA", "mutual_knn": "mutual k-NN",
                 "rsa": "RSA (Spearman of RDMs)", "procrustes": "Procrustes distance (angle)"}


def panel_figure(matrices: dict[str, np.ndarray], to_last: pd.DataFrame, model: str, pool: str, n: int) -> Figure:
    """Five block x block heatmaps (biased and debiased CKA side by side) and, last, each block's
    similarity with the final block by depth: intervals as bands, the permutation null's 95th
    percentile dashed, hollow markers where the similarity is not above the null (Benjamini-Hochberg
    adjusted p >= 0.05 over the blocks x measures)."""
    fig = Figure(figsize=(16, 9.5), layout="constrained")
    axes = fig.subplots(2, 3)
    for ax, (measure, matrix) in zip(axes.flat, matrices.items()):
        distance = measure in compare.LOWER_IS_CLOSER
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
    write_report(client, run_id, summary, folder)
    client.log_artifacts(run_id, str(folder))
    log.info("summary of %d runs logged to run %s (report.html)", len(summary.table), run_id)
    return folder


MAX_REPORT_MAPS = 60  # thumbnails of child maps in report.html (each about 20 KB)


def write_report(client, run_id: str, summary: Summary, folder: Path) -> Path:
    """``report.html`` in ``folder``: the study on one self-contained page (:mod:`latentmap.report`)."""
    import tempfile
    import time

    from latentmap import report

    parent = client.get_run(run_id)
    experiment = parent.info.experiment_id
    uri = str(getattr(client, "tracking_uri", ""))
    ui = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"  # mlflow ui's default
    maps = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, row in enumerate(summary.table.itertuples()):
            thumb = None
            if i < MAX_REPORT_MAPS:
                try:  # each run's file in a folder of its own: every run's scatter is named the same
                    folder_of_run = Path(tmp) / row.run_id
                    folder_of_run.mkdir()
                    thumb = _thumbnail(Path(client.download_artifacts(row.run_id, "plots/scatter.png",
                                                                      str(folder_of_run))))
                except Exception:  # noqa: BLE001 - a run without plots (plots.enabled=false) has no thumbnail
                    thumb = None
            maps.append({"name": str(row.run_name or row.run_id[:8]),
                         "href": f"{ui}/#/experiments/{experiment}/runs/{row.run_id}/artifacts/map.html"
                                 "?workflowType=machine_learning",
                         "thumb": thumb})
        figures = {name: folder / "plots" / f"{name}.png" for name in summary.figures}
        note = (f"{len(summary.table)} finished runs of experiment {experiment}, summarised into run {run_id} on "
                f"{time.strftime('%Y-%m-%d %H:%M')}.")
        text = report.page(f"latentmap study · {parent.info.run_name}", note, summary.table, list(METRICS), figures,
                           summary.tables, maps)
    target = folder / "report.html"
    target.write_text(text, encoding="utf-8")
    return target


def _thumbnail(path: Path, width: int = 240) -> Path:
    """A 240-pixel-wide copy of a PNG, beside it."""
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((width, width * 2))
        small = path.with_name(path.stem + "_thumb.png")
        image.save(small)
    return small
