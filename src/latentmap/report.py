"""``report.html``: one self-contained page for a study (a sweep's parent run, or any selection).

It holds, in order: the summary table (each run's metrics with their confidence intervals), every
figure of the summary (depth curves with bands, the CKA and similarity-panel heatmaps, the
label-free geometry curves), each model's similarity to its final block with the permutation
p-values, and a thumbnail of each child run's map linking to its ``map.html`` in MLflow's UI.

The page makes no request of its own: figures and thumbnails are PNG data URIs, there is no
script, and the stylesheet is inline, so it opens offline and in MLflow's artifact view. Each
table cell carries its run, metric and full-precision value (``data-run``, ``data-metric``,
``data-value``), which the browser test holds against MLflow.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from latentmap import settings
from latentmap.plots import png_data_uri
from latentmap.stats import interval_text as interval  # the pages' formatters, shared with the log lines
from latentmap.stats import number, p_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; max-width: 1500px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
p.note { font-size: 13px; color: #555; margin: 2px 0 8px; }
table { border-collapse: collapse; font-size: 12px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; } td.name, th.name { text-align: left; }
td.weak { color: #999; }
td.stack .p, th .p { display: block; font-size: 11px; color: #777; font-weight: normal; }
td.stack.weak .p { color: #aaa; }
td.with { white-space: normal; min-width: 10em; max-width: 22em; }  /* a test shared by pairs names each */
figure { margin: 8px 0 16px; } figure img { max-width: min(100%, 960px); height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
.maps { display: flex; flex-wrap: wrap; gap: 10px; }
.maps a { display: block; width: 320px; max-width: 100%; font-size: 11px; color: #225; text-decoration: none; }
.maps img, .mapgrid img { width: 100%; height: auto; border: 1px solid #ddd; display: block; box-sizing: border-box; }
.mapgrid { display: grid; gap: 6px; align-items: center; justify-content: start; }
.figgrid { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 8px; max-width: 1300px; }
@media (max-width: 700px) { .figgrid { grid-template-columns: minmax(0, 1fr); } }
.figgrid figure { margin: 0; } .figgrid figure img { width: 100%; }
.mapgrid a { display: block; font-size: 11px; color: #225; text-decoration: none; min-width: 0; }
.mapgrid .colhead { font-size: 12px; font-weight: 600; text-align: center; }
.mapgrid .rowhead { font-size: 12px; font-weight: 600; padding-right: 6px; white-space: nowrap; }
.nothumb { display: block; color: #999; font-size: 11px; padding: 20px 0; text-align: center; }
p.varied, p.constant { font-size: 13px; margin: 4px 0; } details { margin: 8px 0; font-size: 13px; }
"""


def _cell(run: str, metric: str, value: float, low: float, high: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="weak">-</td>'
    return (f'<td data-run="{run}" data-metric="{metric}" data-value="{float(value)!r}">'
            f"{interval(value, low, high)}</td>")


def _shown(value) -> str:
    """A setting's value in a cell: empty where a run does not have it (never ``nan``)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def block_of(row) -> str:
    """The layer as the table says it: the block index the run read, or ``embed`` for the model's
    own embedding (whose ``layer`` setting is unused)."""
    if row.get("pool") == "embed" or pd.isna(row.get("layer_index")):
        return "embed" if row.get("pool") == "embed" else _shown(row.get("varied.layer"))
    return str(int(row["layer_index"]))


def summary_table(table: pd.DataFrame, metrics: list[str], varied: list[str] = (), table_id: str = "summary") -> str:
    """One row per run: a column per varied setting (the run's name when nothing varies), then each
    metric as ``value [lo, hi]``; each metric cell carries ``data-run``, ``data-metric``, ``data-value``."""
    shown = [m for m in metrics if m in table and table[m].notna().any()]
    keys = list(varied) or ["run"]
    head = "".join(f'<th class="name">{html.escape(k)}</th>' for k in keys) + "".join(
        f"<th>{html.escape(m)}</th>" for m in shown)
    rows = []
    for _, row in table.iterrows():
        cells = []
        for key in keys:
            if key == "run":
                text = row.get("run_name") or row["run_id"][:8]
            elif key == "layer":
                text = block_of(row)
            else:
                text = _shown(row.get(f"varied.{key}"))
            cells.append(f'<td class="name">{html.escape(str(text))}</td>')
        cells += [_cell(row["run_id"], m, row[m], row.get(f"{m}_lo", np.nan), row.get(f"{m}_hi", np.nan))
                  for m in shown]
        rows.append(f'<tr data-run="{row["run_id"]}" title="{html.escape(str(row.get("run_name") or ""))}">'
                    + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def differences_table(table: pd.DataFrame) -> str:
    """Pairs of runs on the same images, metric by metric: A, B, the difference A - B with its
    interval, the p-value and the Holm-adjusted one (``p_holm``); a cell per value with ``data-``
    attributes (pair, metric, value)."""
    names = ("compared (A vs B)", "with", "metric")
    head = "".join(f'<th class="name">{c}</th>' if c in names else f"<th>{c}</th>"
                   for c in (*names, "A", "B", "A - B [interval]", "p", "p (Holm)"))
    rows = []
    for _, row in table.iterrows():
        rows.append(
            f'<tr data-a="{row["run_a"]}" data-b="{row["run_b"]}" data-metric="{html.escape(row["metric"])}">'
            f'<td class="name">{html.escape(row["contrast"])}</td>'
            f'<td class="name with">{html.escape(row["fixed"])}</td>'
            f'<td class="name">{html.escape(row["metric"])}</td><td>{number(row["a"])}</td><td>{number(row["b"])}</td>'
            f'<td data-value="{float(row["difference"])!r}">'
            f'{interval(row["difference"], row["lo"], row["hi"], signed=True)}</td>'
            + _p_cells(row["p_value"], row["p_holm"]) + "</tr>")
    return f'<table id="differences"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


MAP_PIXELS = 480  # a map's largest width in the grid (its thumbnail's width: drawn at most 1:1)


def map_grid(items: list[dict[str, Any]], rows_key: str | None, columns_key: str | None) -> str:
    """The runs' maps: a grid with a row per value of ``rows_key`` and a column per value of
    ``columns_key`` (each item's ``values`` holds its settings), or one wrapped row of labelled
    maps when the sweep does not span two settings. Each map links to the run's map.html."""
    def link(item: dict[str, Any], caption: str) -> str:
        thumb = (f'<img alt="map of {html.escape(item["name"])}" src="{png_data_uri(item["thumb"])}">'
                 if item.get("thumb") else '<span class="nothumb">no map</span>')
        return f'<a href="{html.escape(item["href"])}" target="_top" title="{html.escape(item["name"])}">{thumb}' \
               f"{html.escape(caption)}</a>"

    if rows_key is None or columns_key is None:
        cells = "".join(link(item, item["label"]) for item in items)
        return f'<div class="maps">{cells}</div>'
    row_values = list(dict.fromkeys(item["values"].get(rows_key, "") for item in items))
    column_values = list(dict.fromkeys(item["values"].get(columns_key, "") for item in items))
    parts = [f'<div class="mapgrid" style="grid-template-columns: max-content repeat({len(column_values)}, '
             f'minmax(0, {MAP_PIXELS}px))"><div></div>']
    parts += [f'<div class="colhead">{html.escape(f"{columns_key}={v}")}</div>' for v in column_values]
    for value in row_values:
        parts.append(f'<div class="rowhead">{html.escape(f"{rows_key}={value}")}</div>')
        for column in column_values:
            found = [i for i in items if i["values"].get(rows_key, "") == value
                     and i["values"].get(columns_key, "") == column]
            parts.append("".join(link(item, item["extra"]) for item in found) if found else "<div></div>")
    parts.append("</div>")
    return "".join(parts)


def study_page(title: str, note: str, varied: list[str], constant: dict[str, str], table: pd.DataFrame,
               headline: list[str], metrics: list[str], comparisons: dict[str, Any], differences: pd.DataFrame | None,
               difference_note: str, figures: dict[str, Any], tables: dict[str, pd.DataFrame], maps: str) -> str:
    """A sweep's (or any selection's) page: what varied and what all runs share; the runs x headline
    metrics table (every metric in a table below it, folded); a figure per headline metric
    comparing the runs; the pairwise differences of runs on the same images; the study's figures
    (depth curves, CKA and panel heatmaps); each block against the final block; the maps."""
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(note)}</p>']
    if varied:
        values = {key: sorted({_shown(v) for v in table.get(f"varied.{key}", pd.Series(dtype=object))} - {""},
                              key=natural_key) for key in varied}
        said = " &middot; ".join(f"<b>{html.escape(k)}</b> ({len(v)}: {html.escape(', '.join(v[:12]))}"
                                 f"{', ...' if len(v) > 12 else ''})" for k, v in values.items())
        parts.append(f'<p class="varied">What varied: {said}</p>')
    if constant:
        parts.append('<p class="constant">Shared by every run: ' + html.escape(
            " · ".join(f"{k}={v}" for k, v in constant.items())) + "</p>")
    if not table.empty:
        parts += ["<h2>Runs</h2>",
                  '<p class="note">Each headline metric on the scored images with its confidence interval in brackets, '
                  "from the metric recomputed on half-samples (for the map's metrics, by default the map is fitted "
                  f"again on each half; a t-SNE or UMAP map of more than {settings.REFIT_MAPS_UP_TO:,} images is "
                  "held fixed: "
                  "metrics.refit_map; each run's tables/metrics.csv says which). "
                  "Hover a row for the run's name.</p>",
                  summary_table(table, headline, varied),
                  "<details><summary>Every metric "
                  f"({len([m for m in metrics if m in table and table[m].notna().any()])})"
                  "</summary>" + summary_table(table, metrics, varied, "all-metrics") + "</details>"]
    if comparisons:
        parts.append("<h2>The runs compared, metric by metric</h2>")
        parts.append('<p class="note">Each run\'s value (dot) and confidence interval (bar).</p>')
        parts.append('<div class="figgrid">' + "".join(_figure(name, figure) for name, figure in comparisons.items())
                     + "</div>")
    if differences is not None and not differences.empty:
        parts += ["<h2>Pairwise differences</h2>", f'<p class="note">{html.escape(difference_note)}</p>',
                  differences_table(differences)]
    elif difference_note:
        parts += ["<h2>Pairwise differences</h2>", f'<p class="note">{html.escape(difference_note)}</p>']
    depth = {name: figure for name, figure in figures.items() if name.startswith("depth_")}
    if depth:
        parts += ["<h2>By depth</h2>", '<p class="note">Each metric against relative depth (0 = the first block, '
                  "1 = the last), a line per combination of the other varied settings, "
                  "bands: confidence intervals.</p>",
                  '<div class="figgrid">' + "".join(_figure(n, f) for n, f in depth.items()) + "</div>"]
    others = {name: figure for name, figure in figures.items() if name not in depth}
    if others:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(name, figure) for name, figure in others.items()]
    parts += _to_last_section(tables)
    if maps:
        parts += ["<h2>Maps of the runs</h2>", _MAPS_NOTE, maps]
    return _document(title, "\n".join(parts))


def natural_key(text) -> list:
    """Sort key of a setting's value or a label: its numbers by value (``2`` before ``10``,
    ``seed=2`` before ``seed=10``), the rest as text."""
    return [(0, float(part), "") if re.fullmatch(r"-?\d+(\.\d+)?", part) else (1, 0.0, part)
            for part in re.split(r"(-?\d+(?:\.\d+)?)", str(text)) if part]


def caption(name: str) -> str:
    """What a study figure shows, in words, and its file among the run's artifacts
    (``compare_knn_acc_hd`` -> "knn_acc_hd of each run, its value and interval: the k-NN
    classifier's accuracy in the embedding space, out of fold. plots/compare_knn_acc_hd.png")."""
    from latentmap.metrics import MEANING

    shows = name
    for prefix, said in (("compare_", "{} of each run, its value and interval"),
                         ("per_class_depth_", "{} of each class against relative depth"),
                         ("depth_", "{} against relative depth"),
                         ("cka_", "linear CKA between every two blocks, {} (model_pool), beside each block's "
                                  "silhouette and k-NN accuracy"),
                         ("panel_", "the similarity panel between every two blocks, {} (model_pool)")):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            shows = said.format(rest) + (f": {MEANING[rest]}" if rest in MEANING else "")
            break
    return f"{shows}. plots/{name}.png"


def _figure(name: str, figure: Any) -> str:
    return (f'<figure data-name="{html.escape(name)}"><img alt="{html.escape(name)}" '
            f'src="{png_data_uri(figure)}"><figcaption>{html.escape(caption(name))}</figcaption></figure>')


_MAPS_NOTE = ('<p class="note">Each opens the run\'s interactive map.html in MLflow\'s UI (mlflow ui at '
              "127.0.0.1:5000, or the tracking server). MLflow's artifact view shows this page in a sandbox where "
              "links do not navigate: open the page in a tab of its own to follow them.</p>")


def _to_last_section(tables: dict[str, pd.DataFrame]) -> list[str]:
    last = {name: frame for name, frame in tables.items() if name.startswith("to_last_")}
    if not last:
        return []
    parts = ["<h2>Similarity with the final block</h2>",
             '<p class="note">Each cell: value [bootstrap interval], and under it the permutation p-value '
             "(rows of one side shuffled) and the same adjusted by Benjamini-Hochberg (BH) over the blocks "
             "&times; measures of each table (one family); grey: not above the null (adjusted p &ge; 0.05). "
             "The final block against itself is the same input: its values, and no test (-), outside the "
             "family.</p>"]
    parts += [f"<h3>{html.escape(name.removeprefix('to_last_'))}</h3>" + to_last_table(name, frame)
              for name, frame in last.items()]
    return parts


def _document(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _p_cells(p_value: float, adjusted: float) -> str:
    """The raw and the adjusted p-value; significance (not greyed) is read on the adjusted one."""
    weak = "weak" if pd.isna(adjusted) or adjusted >= 0.05 else ""
    return (f'<td class="{weak}">{html.escape(p_text(p_value))}</td>'
            f'<td class="{weak}">{html.escape(p_text(adjusted))}</td>')


def _stacked_head(name: str) -> str:
    """A block table's column head: the measure, and under it what the cells' second line holds."""
    return f'<th>{html.escape(name)}<span class="p">p &middot; BH</span></th>'


def _stacked_cell(attributes: str, value: float, low: float, high: float, p_value: float, adjusted: float) -> str:
    """``value [lo, hi]`` with its p-value and the Benjamini-Hochberg one on a second line, in one
    cell (three cells a measure made a five-measure table twice as wide as a 1,000 px window);
    greyed where the adjusted p is not below 0.05."""
    weak = " weak" if pd.isna(adjusted) or adjusted >= 0.05 else ""
    return (f'<td class="stack{weak}" {attributes}>{interval(value, low, high)}<span class="p">'
            f"p {html.escape(p_text(p_value))} &middot; BH {html.escape(p_text(adjusted))}</span></td>")


def to_last_table(name: str, table: pd.DataFrame) -> str:
    """Each block against the final block: value [interval], p-value and its Benjamini-Hochberg
    adjustment (``p_adjusted``), per measure, one cell each (:func:`_stacked_cell`)."""
    measures = list(dict.fromkeys(table["measure"]))
    head = "<th>block</th>" + "".join(_stacked_head(m) for m in measures)
    rows = []
    for block, group in table.groupby("block"):
        cells = [f"<td>{int(block)}</td>"]
        for measure in measures:
            found = group[group["measure"] == measure].iloc[0]
            cells.append(_stacked_cell(f'data-measure="{measure}" data-value="{float(found["value"])!r}"',
                                       found["value"], found["lo"], found["hi"], found["p_value"],
                                       found.get("p_adjusted", np.nan)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="to-last" data-name="{html.escape(name)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def block_table(table: pd.DataFrame, columns: list[str]) -> str:
    """One row per block: for each column, ``value [lo, hi]`` over its p-value and the adjusted one
    (:func:`_stacked_cell`) where the table has ``<column>_lo``, ``_hi``, ``_p`` and ``_p_adj``;
    each cell carries ``data-block``, ``data-column``, ``data-value``."""
    head = "<th>block</th>" + "".join(_stacked_head(c) for c in columns)
    rows = []
    for _, row in table.iterrows():
        cells = [f"<td>{int(row['layer_index'])}</td>"]
        for column in columns:
            cells.append(_stacked_cell(f'data-block="{int(row["layer_index"])}" data-column="{column}" '
                                       f'data-value="{float(row[column])!r}"', row[column],
                                       row.get(f"{column}_lo", np.nan), row.get(f"{column}_hi", np.nan),
                                       row.get(f"{column}_p", np.nan), row.get(f"{column}_p_adj", np.nan)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="blocks"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def page(title: str, note: str, figures: dict[str, Any], sections: list[tuple[str, str, str]] = ()) -> str:
    """A study's page of tables and figures (the fine-tuning study's): ``sections`` are (heading,
    note, HTML) blocks shown first, then ``figures`` (name -> figure or PNG path)."""
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(note)}</p>']
    for heading, text, body in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", f'<p class="note">{html.escape(text)}</p>', body]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(name, figure) for name, figure in figures.items()]
    return _document(title, "\n".join(parts))
