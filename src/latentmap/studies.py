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
  ``tables/to_last_<model>_<pool>.csv``: the similarity panel of :mod:`latentmap.measures` block x
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

from latentmap import cache, measures, progress, stats
from latentmap.metrics import LABEL_METRICS, NEIGHBOUR_METRICS, PROBE_METRICS
from latentmap.plots import class_colors, comparison, legend_below, legend_height
from latentmap.report import block_of, natural_key
from latentmap.stats import GEOMETRY_METRICS
from latentmap.tracking.run import HEADLINE

log = logging.getLogger(__name__)

METRICS = NEIGHBOUR_METRICS + LABEL_METRICS + PROBE_METRICS + GEOMETRY_METRICS
# Params that say how a run was executed, not what it measured: never a reason to tell runs apart.
_HOW = ("params.device", "params.batch_size", "params.num_workers", "params.output_dir", "params.cache_dir",
        "params.resume", "params.optimized_metric", "params.tracking.", "params.choice.tracking",
        "params.choice.hydra")


def varied_keys(runs: pd.DataFrame, layer: bool = True) -> list[str]:
    """The params that differ among ``runs``, each difference once: a group's option
    (``params.choice.reducer``) stands for every key inside that group (``params.reducer.metric``,
    which one option has and another lacks), so a sweep over ``reducer=pca,umap`` varies one thing.
    Settings that change no result (device, batch size, ...) are left out, and so is the layer
    when ``layer`` is false (it is the depth plots' x axis, not a line)."""
    columns = sorted(c for c in runs.columns if c.startswith("params.") and not c.startswith(_HOW))
    if not layer:
        columns = [c for c in columns if c != "params.layer"]
    differ = [c for c in columns if runs[c].astype(str).nunique(dropna=False) > 1]
    groups = {c.removeprefix("params.choice.") for c in differ if c.startswith("params.choice.")}
    return [c for c in differ
            if c.startswith("params.choice.") or c.removeprefix("params.").split(".")[0] not in groups]


def group_keys(runs: pd.DataFrame) -> list[str]:
    """The params whose combinations are the depth plots' lines: what varies, except the layer."""
    return varied_keys(runs, layer=False)


def key_name(column: str) -> str:
    """``params.choice.model`` -> ``model``; ``params.reducer.n_neighbors`` -> ``reducer.n_neighbors``."""
    return column.removeprefix("params.").removeprefix("choice.")


def label(keys: list[str], values) -> str:
    """``model=vit · reducer=umap``: each key with its value, a missing value left empty."""
    return " · ".join(f"{key_name(key)}={'' if pd.isna(value) else _short(value)}" for key, value in zip(keys, values))


@dataclass
class Summary:
    table: pd.DataFrame
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    varied: list[str] = field(default_factory=list)  # what differs among the runs, as key_name()s
    constant: dict[str, str] = field(default_factory=dict)  # the group options and settings all runs share
    comparisons: dict[str, Figure] = field(default_factory=dict)  # compare_<metric>: the runs side by side
    difference_note: str = ""  # what the pairwise differences hold, or why there are none


def _tag_or_param(runs: pd.DataFrame, tag: str, param: str) -> list:
    """A tag where runs have it, else the param older runs logged (None where neither)."""
    found = runs.get(f"tags.{tag}", pd.Series([None] * len(runs), index=runs.index))
    older = runs.get(f"params.{param}", pd.Series([None] * len(runs), index=runs.index))
    return [a if isinstance(a, str) else (b if isinstance(b, str) else None) for a, b in zip(found, older)]


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One tidy row per run: run_id, model, pool, reducer, layer_index, relative_depth, metrics, the
    ``varied.<key>`` column of each varied param, its ``group`` (the depth plots' line), params."""
    if runs.empty:
        return pd.DataFrame()
    reducer = _tag_or_param(runs, "reducer", "reducer._target_")
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "run_name": runs.get("tags.mlflow.runName"),
        "model": _tag_or_param(runs, "model", "model.name"),
        "pool": runs.get("params.pool"),
        "reducer": [None if r is None else r.rsplit(".", 1)[-1] for r in reducer],
        "layer_index": pd.to_numeric(runs.get("tags.layer_index"), errors="coerce"),
        "num_layers": pd.to_numeric(runs.get("tags.num_layers"), errors="coerce"),
        "relative_depth": pd.to_numeric(runs.get("tags.relative_depth"), errors="coerce"),
        "cache_key": runs.get("tags.cache_key"),
        "cache_dir": runs.get("tags.cache_dir"),
        "dataset_fingerprint": runs.get("tags.dataset_fingerprint"),
        "halves_digest": runs.get("tags.halves_digest"),
        "halves_scale": pd.to_numeric(runs.get("tags.halves_scale"), errors="coerce"),
        "status": runs.get("status"),
    })
    for metric in METRICS:
        for suffix in ("", "_lo", "_hi"):
            table[metric + suffix] = runs.get(f"metrics.{metric}{suffix}", np.nan)
    for key in varied_keys(runs):
        table[f"varied.{key_name(key)}"] = [None if pd.isna(v) else _short(v) for v in runs[key]]
    keys = group_keys(runs)
    table["group"] = [label(keys, row) for row in (runs[keys].itertuples(index=False) if keys else [()] * len(runs))]
    params = runs[sorted(c for c in runs.columns if c.startswith("params."))]
    table = pd.concat([table.reset_index(drop=True), params.reset_index(drop=True)], axis=1)
    return table.sort_values(["group", "model", "pool", "reducer", "layer_index"],
                             na_position="last").reset_index(drop=True)


def constant_settings(runs: pd.DataFrame) -> dict[str, str]:
    """What every run shares, said once above the report's table: each group's option and the
    run-level settings (seed, layer, pool, ...) that are the same in all runs."""
    found = {}
    for column in sorted(c for c in runs.columns if c.startswith("params.") and not c.startswith(_HOW)):
        name = key_name(column)
        values = runs[column].dropna().astype(str).unique()
        if (len(values) == 1 and runs[column].notna().all() and name != "task"
                and (column.startswith("params.choice.") or "." not in name)):
            found[name] = _short(values[0])
    return found


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
    marker, is drawn a little thinner than the one before, and is drawn 2.5 points (at most 15 points
    over all lines) to the side of the one before (on screen only: the plotted data are the exact
    depths)."""
    groups = sorted(table.groupby("group", dropna=False, sort=True), key=lambda item: natural_key(item[0]))
    labels = [str(name) if isinstance(name, str) and name else "all runs" for name, _ in groups]
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
    ax.set_title(f"{metric} by depth" + (" (bands: confidence intervals)" if table[f"{metric}_lo"].notna().any()
                                          else ""))
    ax.grid(alpha=0.3)
    if len(groups) > 1:  # one line needs no legend: the title says what it is
        legend_below(fig, ax)
    return fig


def run_label(row, varied: list[str], skip: tuple[str, ...] = ()) -> str:
    """A run as its varied settings say it (``model=vit · reducer=umap``; the layer as its block),
    or its name when nothing varies."""
    parts = [f"{key}={block_of(row) if key == 'layer' else (row.get(f'varied.{key}') or '')}"
             for key in varied if key not in skip]
    return " · ".join(parts) or str(row.get("run_name") or row["run_id"][:8])


def comparison_figure(table: pd.DataFrame, metric: str, varied: list[str]) -> Figure:
    """``metric`` of each run with its interval, one row per run, coloured by the first varied
    setting when two or more vary (the rows of one model together, say)."""
    rows = table.dropna(subset=[metric])
    if len(varied) >= 2:
        first = varied[0]
        rows = rows.assign(_key=[str(v) for v in rows[f"varied.{first}"]]).sort_values("_key", kind="stable")
        groups = [f"{first}={v}" for v in rows["_key"]]
        names = [run_label(row, varied, skip=(first,)) for _, row in rows.iterrows()]
        names = [f"{g.split('=', 1)[1]} · {n}" for g, n in zip(groups, names)]
    else:
        groups = [""] * len(rows)
        names = [run_label(row, varied) for _, row in rows.iterrows()]
    low = rows.get(f"{metric}_lo", pd.Series(np.nan, index=rows.index)).to_numpy(dtype=float)
    high = rows.get(f"{metric}_hi", pd.Series(np.nan, index=rows.index)).to_numpy(dtype=float)
    banded = np.isfinite(low).any()
    return comparison(names, rows[metric].to_numpy(dtype=float), low, high, groups,
                      f"{metric}" + (" (bars: confidence intervals)" if banded else ""), metric)


def pairwise_differences(client, table: pd.DataFrame, varied: list[str], metrics: list[str] = HEADLINE,
                         confidence: float = 0.95, max_pairs: int = 30) -> tuple[pd.DataFrame, str]:
    """The paired differences of runs on the same images and half-samples that differ in one varied
    setting (model A against model B with everything else equal), for ``metrics``: A - B with its
    interval and p-value (:func:`latentmap.stats.paired_halves`), and Holm's adjustment over the
    whole table (one family). Metrics equal in both runs on every half-sample (the same embedding
    mapped twice) are left out. Returns the table and a note saying what it holds or why it is empty."""
    from itertools import combinations

    from latentmap import logged
    from latentmap.errors import ConfigError

    contrasts = [k for k in varied if k != "layer"]
    if table.empty or not contrasts:
        return pd.DataFrame(), ""
    if table["relative_depth"].nunique() > 1 and "layer" in varied:
        return pd.DataFrame(), ("Not computed for a layer study: the depth curves and the similarity with the final "
                                "block compare its blocks (compare.py compares any two runs).")
    pairs = []
    for a, b in combinations(range(len(table)), 2):
        row_a, row_b = table.iloc[a], table.iloc[b]
        differ = [k for k in varied if row_a.get(f"varied.{k}") != row_b.get(f"varied.{k}")]
        same_images = (pd.notna(row_a["halves_digest"]) and row_a["halves_digest"] == row_b["halves_digest"]
                       and row_a["dataset_fingerprint"] == row_b["dataset_fingerprint"])
        if len(differ) == 1 and differ[0] != "layer" and same_images:
            pairs.append((row_a, row_b))
    if not pairs:
        return pd.DataFrame(), ("No pair of runs differs in one setting on the same images and half-samples "
                                "(the same dataset, seed, metrics.max_points and metrics.bootstrap).")
    kept = pairs[:max_pairs]
    rows, read, unread = [], {}, set()
    for row_a, row_b in kept:
        try:
            for run in (row_a["run_id"], row_b["run_id"]):
                if run not in read:
                    read[run] = logged.halves_table(client, run)
        except ConfigError as error:
            log.warning("no pairwise differences for %s: %s", row_a["run_id"], error)
            unread.add(row_a["run_id"])
            continue
        (values_a, halves_a), (values_b, halves_b) = read[row_a["run_id"]], read[row_b["run_id"]]
        for metric in metrics:
            if metric not in halves_a or metric not in halves_b:
                continue
            found = stats.paired_halves(float(values_a.loc[metric, "value"]), float(values_b.loc[metric, "value"]),
                                        halves_a[metric].to_numpy(), halves_b[metric].to_numpy(),
                                        float(row_a["halves_scale"]), int(values_a.loc[metric, "n"]), confidence)
            if found.difference == 0 and found.lo == 0 and found.hi == 0:
                continue  # the same value on every half-sample: the two runs share this metric's input
            key = next(k for k in varied if row_a.get(f"varied.{k}") != row_b.get(f"varied.{k}"))
            rows.append({"run_a": row_a["run_id"], "run_b": row_b["run_id"],
                         "contrast": f"{key}: {row_a.get(f'varied.{key}') or ''} vs {row_b.get(f'varied.{key}') or ''}",
                         "fixed": run_label(row_a, varied, skip=(key,)) if len(varied) > 1 else "",
                         "metric": metric, "a": found.a, "b": found.b,
                         "difference": found.difference, "lo": found.lo, "hi": found.hi, "p_value": found.p_value})
    differences = pd.DataFrame(rows)
    if not differences.empty:
        differences = differences.sort_values(["contrast", "fixed"], kind="stable").reset_index(drop=True)
    if differences.empty:
        if unread:
            return differences, (f"The half-sample tables of {len(unread)} runs could not be read (runs made before "
                                 "half-sample intervals lack them), so no pair could be compared.")
        return differences, "Every pair agrees on every metric on every half-sample."
    differences["p_holm"] = stats.adjust(differences["p_value"].to_numpy(), "holm")
    note = (f"Runs on the same images and half-samples that differ in one setting, A - B per headline metric with its "
            f"{confidence:.0%} interval and p-value (Student's t over the half-samples, B - 1 degrees of freedom), and "
            f"the p-value adjusted by Holm's method over the {len(differences)} rows of this table (one family); grey: "
            "adjusted p >= 0.05. Metrics equal in both runs on every half-sample are left out.")
    if len(pairs) > max_pairs:
        note += f" The first {max_pairs} of {len(pairs)} pairs are shown (scripts/compare.py compares any two runs)."
    return differences, note


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
    summary = Summary(table=table, varied=[key_name(k) for k in varied_keys(runs)] if not runs.empty else [],
                      constant=constant_settings(runs) if not runs.empty else {})
    if table.empty:
        return summary
    depth_varies = table.groupby("group", dropna=False)["relative_depth"].nunique().max() > 1
    for metric in METRICS if depth_varies else ():  # no depth plot for a sweep at one depth
        if table[metric].notna().any():
            summary.figures[f"depth_{metric}"] = depth_figure(table, metric)
    if not depth_varies and len(table) > 1:  # the headline sweep (models x reducers): runs side by side
        for metric in HEADLINE:
            if metric in table and table[metric].notna().any():
                summary.comparisons[f"compare_{metric}"] = comparison_figure(table, metric, summary.varied)
    block_rows = table[table["pool"].isin(["cls", "mean"]) & table["cache_key"].notna()]
    for (model, pool), rows in block_rows.groupby(["model", "pool"]):
        first = rows.iloc[0]
        try:
            layers = cache.block_features(first["cache_dir"], first["cache_key"], pool)
        except (FileNotFoundError, TypeError, OSError) as error:
            log.warning("no CKA for %s (%s): %s", model, pool, error)
            continue
        rows_kept = measures.subsample_rows(len(layers[0]), max_cka_images, seed)
        if len(rows_kept) < len(layers[0]):
            log.info("CKA for %s on a seeded subsample of %d of %d images", model, len(rows_kept), len(layers[0]))
        matrix = measures.cka_matrix([layer[rows_kept] for layer in layers])
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
    rows = measures.subsample_rows(n, settings.max_images, seed)
    null_rows = measures.subsample_rows(n, settings.null_images, seed + 1)
    k = min(settings.k, max(1, min(len(rows), len(null_rows)) // 4))  # k < N on the smaller sample
    matrices = measures.panel_matrices([layer[rows] for layer in layers], k)
    slug = f"{_slug(model)}_{pool}"
    for measure, matrix in matrices.items():
        summary.tables[f"panel_{slug}_{measure}"] = pd.DataFrame(matrix)
    log.info("similarity panel of %s (%s): %d blocks on %d images; nulls (%d permutations) and intervals "
             "(%d resamples) against the final block on %d images", model, pool, len(layers), len(rows),
             settings.permutations, settings.bootstrap, len(null_rows))
    last = layers[-1][null_rows]
    to_last = []
    for block, layer in enumerate(progress.steps(layers,
                                                 f"panel of {Path(str(model)).name}: each block against the last",
                                                 unit="block")):
        found = measures.panel(layer[null_rows], last, k, settings.permutations, settings.bootstrap, seed=seed + block)
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


def write(summary: Summary, folder: Path) -> Path:
    """Write ``summary.csv``, ``plots/`` and ``tables/`` under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    summary.table.to_csv(folder / "summary.csv", index=False)
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "tables").mkdir(exist_ok=True)
    for name, figure in {**summary.comparisons, **summary.figures}.items():
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
    log.info("summarising %d finished runs into report.html (tables, figures, similarity panels, pairwise "
             "differences)", len(finished))
    summary = summarize(finished, max_cka_images=max_cka_images)
    if summary.table.empty:
        log.info("no finished runs to summarize for %s", run_id)
        return folder
    differences, summary.difference_note = pairwise_differences(client, summary.table, summary.varied)
    if not differences.empty:
        summary.tables["differences"] = differences
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
    varied = summary.varied
    grid = _grid_keys(summary.table, varied)
    items = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, row) in enumerate(summary.table.iterrows()):
            thumb = None
            if i < MAX_REPORT_MAPS:
                try:  # each run's file in a folder of its own: every run's scatter is named the same
                    folder_of_run = Path(tmp) / row["run_id"]
                    folder_of_run.mkdir()
                    thumb = _thumbnail(Path(client.download_artifacts(row["run_id"], "plots/scatter.png",
                                                                      str(folder_of_run))))
                except Exception:  # noqa: BLE001 - a run without plots (plots.enabled=false) has no thumbnail
                    thumb = None
            values = {key: report.block_of(row) if key == "layer" else str(row.get(f"varied.{key}") or "")
                      for key in varied}
            items.append({"name": str(row.get("run_name") or row["run_id"][:8]),
                          "label": run_label(row, varied), "values": values,
                          "extra": run_label(row, varied, skip=grid) if len(varied) > 2 else "",
                          "href": f"{ui}/#/experiments/{experiment}/runs/{row['run_id']}/artifacts/map.html"
                                  "?workflowType=machine_learning",
                          "thumb": thumb})
        figures = {name: folder / "plots" / f"{name}.png" for name in summary.figures}
        comparisons = {name: folder / "plots" / f"{name}.png" for name in summary.comparisons}
        note = (f"{len(summary.table)} finished runs of experiment {experiment}, summarised into run "
                f"{parent.info.run_name} ({run_id}) on {time.strftime('%Y-%m-%d %H:%M')}.")
        text = report.study_page(
            f"latentmap · {parent.info.run_name}", note, varied, summary.constant, summary.table, list(HEADLINE),
            list(METRICS), comparisons, summary.tables.get("differences"), summary.difference_note, figures,
            summary.tables, report.map_grid(items, *grid) if items else "")
    target = folder / "report.html"
    target.write_text(text, encoding="utf-8")
    return target


def _grid_keys(table: pd.DataFrame, varied: list[str]) -> tuple[str | None, str | None]:
    """(rows, columns) of the map grid: the two varied settings, the one with more values as the
    columns (the layer in a layer study); (None, None) when not exactly two vary."""
    if len(varied) != 2:
        return None, None
    counts = {key: table.get(f"varied.{key}", pd.Series(dtype=object)).nunique() for key in varied}
    rows, columns = sorted(varied, key=lambda key: (counts[key], key == "layer"))
    return rows, columns


def _thumbnail(path: Path, width: int = 240) -> Path:
    """A 240-pixel-wide copy of a PNG, beside it."""
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((width, width * 2))
        small = path.with_name(path.stem + "_thumb.png")
        image.save(small)
    return small
