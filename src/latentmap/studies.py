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

from latentmap import cache, measures, progress, stats
from latentmap.audit import CLUSTER_METRICS
from latentmap.metrics import LABEL_METRICS, NEIGHBOUR_METRICS, PROBE_METRICS
from latentmap.plots import comparison
from latentmap.plots import studies as study_plots
from latentmap.report import block_of, natural_key
from latentmap.stats import GEOMETRY_METRICS
from latentmap.tracking.run import HEADLINE

log = logging.getLogger(__name__)

# Every metric a study tabulates and draws by depth: the run's metrics and the audit's cluster agreement.
METRICS = NEIGHBOUR_METRICS + LABEL_METRICS + PROBE_METRICS + GEOMETRY_METRICS + CLUSTER_METRICS
# Params that say how a run was executed, not what it measured: never a reason to tell runs apart.
_HOW = ("params.device", "params.batch_size", "params.num_workers", "params.reuse_freed_memory", "params.output_dir",
        "params.cache_dir", "params.resume", "params.optimized_metric", "params.tracking.", "params.choice.tracking",
        "params.choice.hydra", "params.plots.", "params.choice.plots")


FOLLOW_SEED = ("data_seed", "cv_seed", "reducer_seed")  # conf/config.yaml: ${seed} unless set


def varied_keys(runs: pd.DataFrame, layer: bool = True) -> list[str]:
    """The params that differ among ``runs``, each difference once: a group's option
    (``params.choice.reducer``) stands for every key inside that group (``params.reducer.metric``,
    which one option has and another lacks), so a sweep over ``reducer=pca,umap`` varies one thing,
    unless the key also differs among runs of one option (``model.size`` 8 and 16 among the runs of
    ``model=pixels``, beside runs of ``model=vit``): then it varies too. Settings that change no
    result (device, batch size, ...) are left out, and so is the layer when ``layer`` is false (it
    is the depth plots' x axis, not a line). The seeds that follow ``seed`` (``data_seed``,
    ``cv_seed``, ``reducer_seed``: ``${seed}`` by default) are one difference with it where they
    equal it on every run; other keys that happen to vary together stay two differences."""
    columns = sorted(c for c in runs.columns if c.startswith("params.") and not c.startswith(_HOW))
    if not layer:
        columns = [c for c in columns if c != "params.layer"]
    text = runs[columns].astype(str)
    differ = [c for c in columns if text[c].nunique(dropna=False) > 1]
    groups = {c.removeprefix("params.choice.") for c in differ if c.startswith("params.choice.")}

    def within_an_option(column: str) -> bool:  # model.size 8 and 16 among the pixels runs of model=pixels,vit
        group = column.removeprefix("params.").split(".")[0]
        # non-missing values only: an older run that never logged a newer key does not make it vary
        return bool((runs.groupby(text[f"params.choice.{group}"])[column].nunique(dropna=True) > 1).any())

    varied = [c for c in differ if c.startswith("params.choice.")
              or c.removeprefix("params.").split(".")[0] not in groups or within_an_option(c)]
    if "params.seed" in varied:
        follows = {f"params.{key}" for key in FOLLOW_SEED}
        varied = [c for c in varied if c not in follows or not text[c].equals(text["params.seed"])]
    return varied


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
        "map_refit": runs.get("tags.map_refit"),
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
    """``metric`` against relative depth, a line per group of runs that differ only in their layer,
    in natural order (:func:`latentmap.plots.studies.depth` draws it)."""
    groups = sorted(table.groupby("group", dropna=False, sort=True), key=lambda item: natural_key(item[0]))
    return study_plots.depth([(str(name) if isinstance(name, str) and name else "all runs", rows)
                              for name, rows in groups], metric)


def run_label(row, varied: list[str], skip: tuple[str, ...] = ()) -> str:
    """A run as its varied settings say it (``model=vit · reducer=umap``; the layer as its block),
    or its name when nothing varies."""
    def value(key: str) -> str:  # a run without the key (NaN in the table) shows it empty, not "nan"
        found = row.get(f"varied.{key}")
        return "" if found is None or (not isinstance(found, str) and pd.isna(found)) else str(found)

    parts = [f"{key}={block_of(row) if key == 'layer' else value(key)}" for key in varied if key not in skip]
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


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(text)).name or str(text)).strip("_")[:60]


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
        summary.figures[name] = study_plots.cka(matrix, model, pool, per_layer)
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
    for block, layer in enumerate(progress.steps(layers[:-1],
                                                 f"panel of {Path(str(model)).name}: each block against the last",
                                                 unit="block")):
        found = measures.panel(layer[null_rows], last, k, settings.permutations, settings.bootstrap, seed=seed + block)
        to_last += [{"block": block, **vars(result)} for result in found.values()]
    # The final block against itself: its values (CKA 1, Procrustes 0), and no test of the same input
    # (its p-values were the smallest a permutation test gives, and joined the family below).
    same = measures.panel_values(last, last, k)
    to_last += [{"block": len(layers) - 1, "measure": measure, "value": value, "lo": value, "hi": value,
                 "p_value": np.nan, "null_mean": np.nan, "null_edge": np.nan, "n": len(null_rows)}
                for measure, value in same.items()]
    table = pd.DataFrame(to_last)
    # One family: every block x measure test of this model and pool, Benjamini-Hochberg adjusted (the
    # final block against itself has no test: NaN, left out).
    table["p_adjusted"] = stats.adjust(table["p_value"].to_numpy(), "bh")
    summary.tables[f"to_last_{slug}"] = table
    summary.figures[f"panel_{slug}"] = study_plots.panel(matrices, table, model, pool, len(rows))


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

