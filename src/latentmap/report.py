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

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; max-width: 1500px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
p.note { font-size: 13px; color: #555; margin: 2px 0 8px; }
table { border-collapse: collapse; font-size: 12px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; } td.name { text-align: left; }
td.weak { color: #999; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
.maps { display: flex; flex-wrap: wrap; gap: 10px; }
.maps a { display: block; width: 240px; font-size: 11px; color: #225; text-decoration: none; }
.maps img { width: 240px; height: auto; border: 1px solid #ddd; }
"""


def _png(figure_or_path: Any, dpi: int = 110) -> str:
    """A data URI of a matplotlib figure or a PNG file."""
    if isinstance(figure_or_path, (str, Path)):
        data = Path(figure_or_path).read_bytes()
    else:
        buffer = io.BytesIO()
        figure_or_path.savefig(buffer, format="png", dpi=dpi)
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _cell(run: str, metric: str, value: float, low: float, high: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '<td class="weak">-</td>'
    interval = "" if any(v is None or math.isnan(v) for v in (low, high)) else f" [{low:.3f}, {high:.3f}]"
    return (f'<td data-run="{run}" data-metric="{metric}" data-value="{float(value)!r}">'
            f"{value:.3f}{interval}</td>")


def summary_table(table: pd.DataFrame, metrics: list[str]) -> str:
    """One row per run: its name columns, then each metric as ``value [lo, hi]``."""
    shown = [m for m in metrics if m in table and table[m].notna().any()]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in ["run", "group", "layer", "reducer", *shown])
    rows = []
    for _, row in table.iterrows():
        cells = [f'<td class="name">{html.escape(str(row.get("run_name") or row["run_id"][:8]))}</td>',
                 f'<td class="name">{html.escape(str(row.get("group", "")))}</td>',
                 f"<td>{'' if pd.isna(row.get('layer_index')) else int(row['layer_index'])}</td>",
                 f'<td class="name">{html.escape(str(row.get("reducer", "")))}</td>']
        cells += [_cell(row["run_id"], m, row[m], row.get(f"{m}_lo", np.nan), row.get(f"{m}_hi", np.nan))
                  for m in shown]
        rows.append(f'<tr data-run="{row["run_id"]}">' + "".join(cells) + "</tr>")
    return f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _p_cells(p_value: float, adjusted: float) -> str:
    """The raw and the adjusted p-value; significance (not greyed) is read on the adjusted one."""
    weak = "weak" if pd.isna(adjusted) or adjusted >= 0.05 else ""
    return (f'<td class="{weak}">{"" if pd.isna(p_value) else f"{p_value:.3g}"}</td>'
            f'<td class="{weak}">{"" if pd.isna(adjusted) else f"{adjusted:.3g}"}</td>')


def to_last_table(name: str, table: pd.DataFrame) -> str:
    """Each block against the final block: value [interval], p-value and its Benjamini-Hochberg
    adjustment (``p_adjusted``), per measure."""
    measures = list(dict.fromkeys(table["measure"]))
    head = "<th>block</th>" + "".join(f"<th>{html.escape(m)}</th><th>p</th><th>p (BH)</th>" for m in measures)
    rows = []
    for block, group in table.groupby("block"):
        cells = [f"<td>{int(block)}</td>"]
        for measure in measures:
            found = group[group["measure"] == measure].iloc[0]
            interval = "" if np.isnan(found["lo"]) else f" [{found['lo']:.3f}, {found['hi']:.3f}]"
            cells.append(f'<td data-measure="{measure}" data-value="{float(found["value"])!r}">'
                         f"{found['value']:.3f}{interval}</td>")
            cells.append(_p_cells(found["p_value"], found.get("p_adjusted", np.nan)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="to-last" data-name="{html.escape(name)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def block_table(table: pd.DataFrame, columns: list[str]) -> str:
    """One row per block: for each column, ``value [lo, hi]``, its p-value and the adjusted one where
    the table has ``<column>_lo``, ``_hi``, ``_p`` and ``_p_adj``; each value cell carries
    ``data-block``, ``data-column``, ``data-value``."""
    head = "<th>block</th>" + "".join(f"<th>{html.escape(c)}</th><th>p</th><th>p (BH)</th>" for c in columns)
    rows = []
    for _, row in table.iterrows():
        cells = [f"<td>{int(row['layer_index'])}</td>"]
        for column in columns:
            low, high = row.get(f"{column}_lo", np.nan), row.get(f"{column}_hi", np.nan)
            interval = "" if pd.isna(low) or pd.isna(high) else f" [{low:.3f}, {high:.3f}]"
            cells.append(f'<td data-block="{int(row["layer_index"])}" data-column="{column}" '
                         f'data-value="{float(row[column])!r}">{row[column]:.3f}{interval}</td>')
            cells.append(_p_cells(row.get(f"{column}_p", np.nan), row.get(f"{column}_p_adj", np.nan)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="blocks"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def page(title: str, note: str, table: pd.DataFrame, metrics: list[str], figures: dict[str, Any],
         tables: dict[str, pd.DataFrame], maps: list[dict[str, str]],
         sections: list[tuple[str, str, str]] = ()) -> str:
    """The whole page. ``figures``: name -> figure (or PNG path); ``maps``: each child's
    ``{"name", "href", "thumb"}`` (thumb: a PNG path or None); ``sections``: (heading, note, HTML)
    blocks shown before the figures (the fine-tuning study's per-block table)."""
    parts = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(note)}</p>']
    if not table.empty:
        parts += ["<h2>Runs</h2>",
                  '<p class="note">Each metric on the scored images with its confidence interval in brackets, '
                  "from the metric recomputed on half-samples (what it covers: which images were scored, with "
                  "the 2-D map held fixed; see the README).</p>",
                  summary_table(table, metrics)]
    for heading, text, body in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", f'<p class="note">{html.escape(text)}</p>', body]
    parts.append("<h2>Figures</h2>")
    for name, figure in figures.items():
        parts.append(f'<figure data-name="{html.escape(name)}"><img alt="{html.escape(name)}" '
                     f'src="{_png(figure)}"><figcaption>{html.escape(name)}</figcaption></figure>')
    last = {name: frame for name, frame in tables.items() if name.startswith("to_last_")}
    if last:
        parts.append("<h2>Similarity with the final block</h2>")
        parts.append('<p class="note">Value [bootstrap interval], the permutation p-value (rows of one side '
                     "shuffled) and the same adjusted by Benjamini-Hochberg over the blocks &times; measures of "
                     "each table (one family); grey: not above the null (adjusted p &ge; 0.05).</p>")
        parts += [f"<h3>{html.escape(name.removeprefix('to_last_'))}</h3>" + to_last_table(name, frame)
                  for name, frame in last.items()]
    if maps:
        parts.append("<h2>Maps of the runs</h2>")
        parts.append('<p class="note">Each opens the run\'s interactive map.html in MLflow\'s UI (mlflow ui at '
                     "127.0.0.1:5000, or the tracking server). MLflow's artifact view shows this page in a "
                     "sandbox where "
                     'links do not navigate: open the page in a tab of its own to follow them.</p><div class="maps">')
        for item in maps:
            thumb = f'<img alt="map of {html.escape(item["name"])}" src="{_png(item["thumb"])}">' if item.get(
                "thumb") else ""
            parts.append(f'<a href="{html.escape(item["href"])}" target="_top">{thumb}{html.escape(item["name"])}</a>')
        parts.append("</div>")
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")
