"""``map.html``: the 2-D map as one self-contained page (Plotly, its JavaScript embedded).

* Every point is drawn, up to ``plots.map_max_points`` (1,000,000 by default; above, a seeded,
  class-stratified subsample, and the page says so). Above :data:`WEBGL_ABOVE` points the traces
  are WebGL (``scattergl``); coordinates travel as base64 float32, rows as int32, labels as uint8 or
  uint16, so a million points weigh about 23 MB.
* One trace per class, coloured as in the static plots; clicking a legend entry hides or shows
  the class (Plotly's own legend behaviour).
* Hovering a point shows its label, dataset index and coordinates, and its thumbnail and file
  (folder and name, for images read from files) when it has a thumbnail. Thumbnails are PNG data
  URIs of a seeded, class-stratified sample of the points, as many as fit the page's budget
  (``plots.map_max_mb``, 60 MB; at most ``plots.map_thumbnails``); the points that have one are
  ringed (their own legend entry) and the page says how many.
* Clicking a point with a thumbnail lists its k nearest neighbours in the embedding space (its
  geometry, cosine by default) among the points with thumbnails, with their images; neighbours of
  another class are marked.
* With the data audit's columns (:mod:`latentmap.audit`), a "colour by" control recolours the points
  by cluster (k-means, HDBSCAN), suspected label error, duplicate, outlier score or whether the probe
  got the image right, and a filter shows only suspected label errors or duplicates (the others
  faded); hovering a suspected label error shows its given and suggested label.

The page needs no network and no other file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable

import numpy as np

from latentmap.plots import NAME_CHARACTERS, png_data_uri, shortened_apart

log = logging.getLogger(__name__)

WEBGL_ABOVE = 5000  # SVG markers below (crisp, no WebGL needed), WebGL above
# The audit's per-image columns map.html offers: (kind, what the control calls it, which value is bad).
# category: a colour per value (-1 noise, -2 not scored); flag: 1 / 0 (-2 not scored); value: a scale.
COLUMNS = {"cluster_kmeans": ("category", "k-means cluster", None),
           "cluster_hdbscan": ("category", "HDBSCAN cluster", None),
           "label_issue": ("flag", "suspected label error", 1), "duplicate": ("flag", "duplicate", 1),
           "probe_correct": ("flag", "probe right or wrong", 0), "outlier_score": ("value", "outlier score", None),
           "suggested": ("hidden", "suggested label", None)}
FILTERS = {"label_issue": "suspected label errors only", "duplicate": "duplicates only"}
# Each kind's array on the page (flags 1 byte, clusters and labels 2, scores 4): at a million points
# the columns add about 17 MB of base64 to the page, within plots.map_max_mb.
_COLUMN_DTYPES = {"category": np.int16, "hidden": np.int16, "flag": np.int8, "value": np.float32}
_COLUMN_TYPES = {"category": "Int16Array", "hidden": "Int16Array", "flag": "Int8Array", "value": "Float32Array"}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 12px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; }
.lm-note { font-size: 13px; color: #555; margin: 2px 0; }
/* The neighbour panel has a column of its own from the first draw, so the plot is sized beside it
   and never covers it; narrower than 820 px it sits below the plot, full width. */
#lm-controls { font-size: 13px; margin: 6px 0; display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
#lm-key { font-size: 12px; display: flex; flex-wrap: wrap; gap: 4px 10px; }
#lm-key span.lm-swatch { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border-radius: 50%; }
.lm-suggested { color: #d62728; }
.lm-file { color: #555; max-width: 240px; overflow-wrap: anywhere; }
#lm-layout { display: grid; grid-template-columns: minmax(0, 1fr) minmax(240px, 300px); gap: 16px;
  align-items: start; }
#lm-plot { min-width: 0; overflow: hidden; }
@media (max-width: 820px) { #lm-layout { grid-template-columns: minmax(0, 1fr); } }

#lm-tooltip { position: fixed; display: none; pointer-events: none; background: #fff;
  border: 1px solid #888; border-radius: 4px; padding: 6px; font-size: 12px; z-index: 10;
  box-shadow: 0 2px 6px rgba(0,0,0,.25); }
#lm-tooltip img, #lm-neighbours img { width: 64px; height: 64px; image-rendering: pixelated;
  display: block; object-fit: contain; }
#lm-neighbours { font-size: 12px; min-width: 0; position: relative; z-index: 1; background: #fff; }
#lm-neighbours .lm-grid { display: flex; flex-wrap: wrap; gap: 6px; }
#lm-neighbours figure { margin: 0; padding: 2px; border: 2px solid transparent; }
#lm-neighbours figure.lm-wrong { border-color: #d62728; }
#lm-neighbours figcaption { max-width: 64px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
.lm-nothumb { width: 64px; height: 64px; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #777; font-size: 10px; text-align: center; }
"""

_SCRIPT = """
(function () {
  requestAnimationFrame(() => { window.lmFirstDraw = performance.now(); });  // ms from navigation to drawn
  const lm = JSON.parse(document.getElementById('lm-data').textContent);
  const gd = document.getElementById('{plot_id}');
  const decode = (text, Type) => {
    if (text === null) return null;
    const bin = atob(text), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  };
  const labels = decode(lm.label, lm.label_bytes === 2 ? Uint16Array : Uint8Array);
  const indices = decode(lm.index, Int32Array);  // null: a point's dataset index is its row
  const indexOf = (row) => (indices ? indices[row] : row);
  const labelOf = (row) => lm.classes[labels[row]];
  const tip = () => document.getElementById('lm-tooltip');  // looked up when used: parsed after this
  const panel = () => document.getElementById('lm-neighbours');
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const image = (row) => (lm.thumbs[row] ? `<img src="${lm.thumbs[row]}" alt="image ${indexOf(row)}">`
                                         : '<div class="lm-nothumb">no thumbnail</div>');
  const columns = {};
  const arrays = {Int8Array, Int16Array, Float32Array};
  for (const [name, spec] of Object.entries(lm.columns || {})) columns[name] = decode(spec.data, arrays[spec.type]);
  const flagged = (row) => columns.label_issue && columns.label_issue[row] === 1;
  const suggestion = (row) => (flagged(row) && columns.suggested ?
    `<div class="lm-suggested">suspected label error: suggested ${esc(lm.classes[columns.suggested[row]])}</div>` : '');
  const card = (row) => image(row) +
    `<div class="lm-label">${esc(labelOf(row))}</div>${suggestion(row)}` +
    `<div class="lm-index">index ${indexOf(row)}</div>` +
    (lm.files && lm.files[row] ? `<div class="lm-file">${esc(lm.files[row])}</div>` : '');
  // Colour by an audit column, and filter to suspected label errors or duplicates.
  const palette = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf',
                   '#bcbd22', '#7f7f7f', '#aec7e8', '#ffbb78', '#98df8a', '#ff9896', '#c5b0d5', '#c49c94',
                   '#f7b6d2', '#9edae5', '#dbdb8d', '#393b79'];
  const viridis = (t) => {
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2);
    const f = x - i, c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };
  // Trace "class c" holds the points of class c in row order (as map_html adds them).
  const classTraces = gd.data.map((t, i) => (String(t.meta).startsWith('class ') ? i : -1)).filter((i) => i >= 0);
  const original = classTraces.map((i) => gd.data[i].marker.color);
  const originalOpacity = classTraces.map((i) => gd.data[i].marker.opacity);
  const members = {};
  labels.forEach((c, row) => { (members[c] = members[c] || []).push(row); });
  const rowsOf = (i) => members[Number(String(gd.data[i].meta).slice(6))] || [];
  let range = null;
  const colour = (name, row) => {
    const spec = lm.columns[name], v = columns[name][row];
    if (v === -2) return '#dddddd';  // not scored by the audit
    if (spec.kind === 'category') return v < 0 ? '#bbbbbb' : palette[v % palette.length];
    if (spec.kind === 'flag') return v === 1 ? (spec.bad === 0 ? '#2ca02c' : '#d62728') :
      (spec.bad === 0 ? '#d62728' : '#c8c8c8');
    return viridis((v - range[0]) / Math.max(range[1] - range[0], 1e-12));
  };
  const key = (name) => {
    const box = document.getElementById('lm-key');
    if (!box) return;
    const sw = (c, text) => `<span><span class="lm-swatch" style="background:${c}"></span>${esc(text)}</span>`;
    if (name === 'class') { box.innerHTML = ''; return; }
    const spec = lm.columns[name];
    if (spec.kind === 'flag') {
      box.innerHTML = spec.bad === 0 ? sw('#2ca02c', 'right') + sw('#d62728', 'wrong') + sw('#dddddd', 'not scored')
        : sw('#d62728', spec.label) + sw('#c8c8c8', 'other images') + sw('#dddddd', 'not scored');
    } else if (spec.kind === 'category') {
      const seen = [...new Set(Array.from(columns[name]).filter((v) => v >= 0))].sort((a, b) => a - b);
      box.innerHTML = seen.slice(0, 20).map((v) => sw(palette[v % palette.length], `${spec.label} ${v}`)).join('') +
        (seen.length > 20 ? `<span>... ${seen.length} in all (colours repeat)</span>` : '') +
        (Array.from(columns[name]).includes(-1) ? sw('#bbbbbb', 'noise') : '') +  // HDBSCAN's; k-means has none
        (Array.from(columns[name]).includes(-2) ? sw('#dddddd', 'not scored') : '');
    } else {
      box.innerHTML = sw(viridis(0), `${range[0].toPrecision(3)}`) + sw(viridis(0.5), '') +
        sw(viridis(1), `${range[1].toPrecision(3)} ${spec.label}`) +
        '<span>(the 1st to the 99th percentile; lower and higher take the end colours)</span>';
    }
  };
  const recolour = (name) => {
    if (name !== 'class' && lm.columns[name].kind === 'value') {
      const values = Array.from(columns[name]).filter((v) => v !== -2 && Number.isFinite(v)).sort((a, b) => a - b);
      range = [values[Math.floor(0.01 * (values.length - 1))], values[Math.floor(0.99 * (values.length - 1))]];
    }
    const colours = classTraces.map((i, j) => (name === 'class' ? original[j] : rowsOf(i).map((r) => colour(name, r))));
    gd.dataset.colourBy = name;  // before the redraws: the legend's swatches follow it
    Plotly.restyle(gd, {'marker.color': colours}, classTraces);
    Plotly.relayout(gd, {'legend.title.text': name === 'class' ? 'class<br>(click to hide)'
                                                                : 'class (click to hide);<br>colours: the key above'});
    key(name);
  };
  // Plotly draws a class's legend swatch in the colour and opacity of the trace's first point: under
  // an audit colouring or a filter, that point's audit colour or fade. After every draw the class
  // swatches are set to the class's own colour and opacity when the points are coloured by class, and
  // to one neutral grey under an audit colouring (a class colour there reads as the key's: a green
  // class beside "right").
  const neutral = '#9a9a9a';
  const swatches = () => {
    const byClass = (gd.dataset.colourBy || 'class') === 'class';
    gd.querySelectorAll('g.legend g.traces').forEach((item) => {
      const d = item.__data__, trace = d && d[0] && d[0].trace;
      const j = trace ? classTraces.indexOf(trace.index) : -1;
      if (j < 0) return;
      item.querySelectorAll('path.scatterpts').forEach((path) => {
        path.style.fill = byClass ? original[j] : neutral;
        if (typeof originalOpacity[j] === 'number') path.style.opacity = String(originalOpacity[j]);
      });
    });
  };
  gd.on('plotly_afterplot', swatches);
  const refilter = (name) => {
    const keep = (r) => name === 'all' || columns[name][r] === 1;
    let shown = 0;
    const opacity = classTraces.map((i) => rowsOf(i).map((r) => {
      const k = keep(r);
      shown += k;
      return k ? 0.9 : 0.04;
    }));
    Plotly.restyle(gd, {'marker.opacity': opacity}, classTraces);
    const note = document.getElementById('lm-filter-count');
    if (note) note.textContent = name === 'all' ? '' : `${shown} images shown, the others faded.`;
    gd.dataset.filter = name;
    gd.dataset.shown = String(shown);
  };
  const colourBox = document.getElementById('lm-colour'), filterBox = document.getElementById('lm-filter');
  if (colourBox) colourBox.addEventListener('change', () => recolour(colourBox.value));
  if (filterBox) filterBox.addEventListener('change', () => refilter(filterBox.value));
  // The tooltip of a row at a screen position; also callable from scripts (gd.lmTip(row, x, y)).
  gd.lmTip = (row, clientX, clientY, xy = '') => {
    const box = tip();
    box.dataset.row = row;
    box.innerHTML = card(row) + xy;
    box.style.left = (clientX + 14) + 'px';
    box.style.top = (clientY + 14) + 'px';
    box.style.display = 'block';
  };
  gd.on('plotly_hover', (event) => {
    const point = event.points[0], e = event.event || {clientX: 0, clientY: 0};
    gd.lmTip(point.customdata, e.clientX, e.clientY,
             `<div class="lm-xy">(${point.x.toPrecision(4)}, ${point.y.toPrecision(4)})</div>`);
  });
  gd.on('plotly_unhover', () => { tip().style.display = 'none'; });
  gd.on('plotly_click', (event) => {
    tip().style.display = 'none';  // the panel now shows the point: its tooltip would cover the panel's edge
    const row = event.points[0].customdata;
    const side = panel();
    side.dataset.row = row;
    const found = lm.neighbours[row];
    if (!found) {
      side.innerHTML = `<div class="lm-query">${card(row)}</div><p class="lm-note">Neighbours are listed for the ` +
        `${lm.n_thumbs} ringed points, the ones with thumbnails; click one of those.</p>`;
      side.scrollIntoView({block: 'nearest'});
      return;
    }
    const items = found.map((n) => {
      const wrong = labels[n] !== labels[row];
      return `<figure class="${wrong ? 'lm-wrong' : 'lm-same'}" data-row="${n}">` + image(n) +
        `<figcaption>${esc(labelOf(n))}${wrong ? ' ✗' : ''}<br>#${indexOf(n)}</figcaption></figure>`;
    }).join('');
    side.innerHTML = `<h2 style="font-size:14px">${lm.k} nearest in the embedding space (${esc(lm.distance)}), ` +
      `among the ${lm.n_thumbs} points with thumbnails</h2>` +
      `<div class="lm-query">${card(row)}</div><div class="lm-grid">${items}</div>` +
      `<p class="lm-note">red: another class</p>`;
    const box = side.getBoundingClientRect();  // stacked below a tall plot: bring it into view
    if (box.top > window.innerHeight || box.bottom < 0) side.scrollIntoView({block: 'nearest'});
  });
})();
"""


def _controls(columns: dict) -> str:
    """The colour-by and filter controls for the audit's columns (nothing without any)."""
    shown = [name for name in COLUMNS if name in columns and COLUMNS[name][0] != "hidden"]
    if not shown:
        return ""
    options = '<option value="class">class</option>' + "".join(
        f'<option value="{name}">{html.escape(COLUMNS[name][1])}</option>' for name in shown)
    kept = [name for name in FILTERS if name in columns]  # no "show" control when there is nothing to filter by
    filters = ('<label>show <select id="lm-filter"><option value="all">all images</option>' + "".join(
        f'<option value="{name}">{html.escape(FILTERS[name])}</option>' for name in kept) + '</select></label>'
        '<span id="lm-filter-count" class="lm-note"></span>') if kept else ""
    return (f'<div id="lm-controls"><label>colour by <select id="lm-colour">{options}</select></label>'
            f'{filters}<div id="lm-key"></div></div>')


def _base64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def script_json(payload) -> str:
    """``payload`` as JSON to place inside a ``<script>`` element: every ``<``, ``>`` and ``&`` as a
    JSON escape, which parses to the same string. Escaping ``</`` alone let a class named
    ``<!--<script>`` put the HTML parser in its script-in-comment state, where the element never
    ends: the page drew nothing."""
    text = json.dumps(payload, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def fit_thumbnails(rows: np.ndarray, decode: Callable[[np.ndarray], list[np.ndarray]],
                   budget: int, extra: int = 0, chunk: int = 500) -> tuple[np.ndarray, list[str]]:
    """(rows kept, their PNG data URIs): the first of ``rows`` (in their order, e.g. a class-balanced
    one) whose thumbnails, decoded ``chunk`` at a time by ``decode(rows)``, fit ``budget`` bytes,
    each counted as its data URI plus ``extra`` bytes (what else the page holds for it). A chunk's
    PNGs are encoded in threads (Pillow's encoder releases the GIL), in order."""
    from concurrent.futures import ThreadPoolExecutor

    from latentmap.machine import usable_cores

    kept: list[int] = []
    uris: list[str] = []
    used = 0
    cores = usable_cores()
    with ThreadPoolExecutor(max_workers=min(4, cores)) as pool:
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            for row, uri in zip(part, pool.map(png_data_uri, decode(part))):
                if used + len(uri) + extra > budget:
                    return np.asarray(kept, dtype=np.int64), uris
                used += len(uri) + extra
                kept.append(int(row))
                uris.append(uri)
    return np.asarray(kept, dtype=np.int64), uris


def page_within(coords: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None, indices: np.ndarray,
                candidates: np.ndarray, decode: Callable[[np.ndarray], list[np.ndarray]],
                neighbours_of: Callable[[np.ndarray], np.ndarray], k: int, colors: np.ndarray, title: str,
                note: str, distance: str, max_mb: float,
                columns: dict[str, np.ndarray] | None = None, texts: list | None = None,
                files: dict[int, str] | None = None) -> tuple[str, np.ndarray]:
    """(the page, rows with thumbnails): :func:`map_html` with thumbnails for as many of
    ``candidates`` (rows of the points, in order) as keep the page within ``max_mb`` megabytes.
    The page without thumbnails is measured; each thumbnail then costs its data URI, its ring
    (x, y and row, 16 bytes of base64) and its keys and neighbour list in the page's JSON.
    ``neighbours_of(rows)`` gives each kept row's (up to ``k``) neighbours, as positions in rows;
    ``files`` ``{row: file name}`` of the candidates, shown with a thumbnailed point (the longest
    candidate's name is counted for each thumbnail)."""
    bare = map_html(coords, labels, class_names, indices, np.zeros(0, np.int64), [], np.zeros((0, 0), np.int64),
                    colors, title, note, distance, columns, texts)
    digits = len(str(len(coords)))
    extra = 16 + 2 * (digits + 4) + k * (digits + 1) + 4
    if files is not None and len(candidates):  # its name in the page's JSON: "row": "name", (escaped at worst x6)
        extra += digits + 6 + 6 * max(len(files.get(int(row), "")) for row in candidates)
    budget = int(max_mb * 1e6) - len(bare.encode()) - 4000  # the ring trace's own JSON and the longer note
    thumbed, uris = fit_thumbnails(candidates, decode, max(budget, 0), extra)
    found = neighbours_of(thumbed) if len(thumbed) > 1 else np.zeros((len(thumbed), 0), np.int64)
    page = map_html(coords, labels, class_names, indices, thumbed, uris, found, colors, title, note, distance, columns,
                    texts, None if files is None else [files.get(int(row), "") for row in thumbed])
    return page, thumbed


def map_html(
    coords: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str] | None,
    indices: np.ndarray,
    thumb_rows: np.ndarray,
    thumbnails: list[str],
    neighbours: np.ndarray,
    colors: np.ndarray,
    title: str,
    note: str = "",
    distance: str = "cosine",
    columns: dict[str, np.ndarray] | None = None,
    texts: list[tuple[str, float, float]] | None = None,
    files: list[str] | None = None,
) -> str:
    """The page for the points given (already subsampled, if at all).

    Args:
        coords: (P, 2) map coordinates of the points on the page.
        labels: (P,) class ids, or None for an unlabelled set.
        indices: (P,) dataset index of each point.
        thumb_rows: (T,) rows (into the P points) that have a thumbnail.
        thumbnails: T PNG data URIs (:func:`fit_thumbnails`), one a row of ``thumb_rows``.
        neighbours: (T, k) positions (into ``thumb_rows``) of each thumbnailed point's nearest
            neighbours among the thumbnailed points.
        colors: (C, 4) RGBA class colours.
        note: a line shown under the title (e.g. that the page shows a subsample).
        distance: the geometry the neighbours were found in (``metrics.distance``), named on the page.
        columns: (P,) per-point values of the audit (:data:`COLUMNS`) to colour and filter by.
        texts: (label, x, y) places drawn as labelled stars (an image-text model's class prompts).
        files: (T,) the file name of each thumbnailed point, in ``thumb_rows``' order (None: none).
    """
    import plotly.graph_objects as go

    n = len(coords)
    classes = list(class_names) if labels is not None else ["(unlabelled)"]
    label_ids = labels if labels is not None else np.zeros(n, dtype=np.int64)
    label_type = np.uint8 if len(classes) <= 256 else np.uint16
    indices = np.asarray(indices, dtype=np.int64)
    thumb_rows = np.asarray(thumb_rows, dtype=np.int64)
    payload = {
        "classes": classes,
        "label": _base64(label_ids.astype(label_type)),
        "label_bytes": np.dtype(label_type).itemsize,
        "index": None if np.array_equal(indices, np.arange(n)) else _base64(indices.astype(np.int32)),
        "thumbs": {int(row): uri for row, uri in zip(thumb_rows, thumbnails)},
        "neighbours": {int(row): thumb_rows[found].tolist() for row, found in zip(thumb_rows, neighbours)},
        "n_thumbs": len(thumb_rows),
        "files": None if files is None else {int(row): name for row, name in zip(thumb_rows, files)},
        "k": int(neighbours.shape[1]) if len(thumb_rows) else 0,
        "distance": distance,
        "columns": {name: {"kind": COLUMNS[name][0], "label": COLUMNS[name][1], "bad": COLUMNS[name][2],
                           "type": _COLUMN_TYPES[COLUMNS[name][0]],
                           "data": _base64(np.asarray(values).astype(_COLUMN_DTYPES[COLUMNS[name][0]]))}
                    for name, values in (columns or {}).items() if name in COLUMNS},
    }
    scatter = go.Scattergl if n > WEBGL_ABOVE else go.Scatter
    size = 7 if n < 2000 else 4 if n < 50_000 else 2
    figure = go.Figure()
    legend_names = shortened_apart([str(name) for name in classes], NAME_CHARACTERS["legend"])
    for c in range(len(classes)):
        rows = np.flatnonzero(label_ids == c).astype(np.int32)
        if len(rows) == 0:
            continue
        r, g, b, _ = (255 * colors[c]).astype(int)
        figure.add_trace(scatter(
            x=coords[rows, 0].astype(np.float32), y=coords[rows, 1].astype(np.float32), mode="markers",
            # Plotly reads tags in a trace's name (a class "a<b>c" was drawn "ac", "c" bold): escaped, as written
            customdata=rows, hoverinfo="none", meta=f"class {c}",
            name=html.escape(legend_names[c], quote=False) if labels is not None
            else "images",
            marker={"size": size, "color": f"rgb({r},{g},{b})", "opacity": 0.8},
        ))
    if len(thumb_rows) < n:  # ring the points that have a thumbnail (and neighbours)
        figure.add_trace(scatter(
            x=coords[thumb_rows, 0].astype(np.float32), y=coords[thumb_rows, 1].astype(np.float32),
            mode="markers", customdata=thumb_rows.astype(np.int32), hoverinfo="none",
            name=f"with thumbnail ({len(thumb_rows)})",
            marker={"size": size + 4, "symbol": "circle-open", "color": "rgba(0,0,0,0.55)", "line": {"width": 1}},
        ))
    if texts:  # the class prompts of an image-text model, placed in the map by the reducer
        figure.add_trace(go.Scatter(
            x=[t[1] for t in texts], y=[t[2] for t in texts], mode="markers+text",
            text=[html.escape(t[0], quote=False) for t in texts],
            textposition="top center", hoverinfo="skip", name="class prompts (text)", meta="text",
            marker={"size": 14, "symbol": "star", "color": "#111", "line": {"width": 1, "color": "#fff"}},
            textfont={"size": 12, "color": "#111"}))
    # The plot fills its frame's width (MLflow's artifact view is about 715 px wide), its legend at the
    # right inside it; the top margin keeps Plotly's toolbar above the legend's title.
    figure.update_layout(autosize=True, margin={"l": 40, "r": 10, "t": 36, "b": 30},
                         legend={"title": {"text": "class<br>(click to hide)"}, "itemsizing": "constant",
                                 "yanchor": "top", "y": 1.0},
                         plot_bgcolor="white", hovermode="closest")
    figure.update_xaxes(showgrid=False, zeroline=False)
    # One unit is as long on both axes (the map's distances are euclidean): the shape stays the same
    # at any window width; Plotly widens the shorter axis's range rather than leave the frame empty.
    figure.update_yaxes(showgrid=False, zeroline=False, scaleanchor="x", scaleratio=1)
    plot = figure.to_html(full_html=False, include_plotlyjs=True, div_id="lm-map", post_script=_SCRIPT,
                          default_width="100%", default_height="max(360px, min(760px, 80vh))",
                          config={"displaylogo": False, "responsive": True})
    data_json = script_json(payload)
    thumbs_note = (f"All {n} points have a thumbnail." if len(thumb_rows) == n else
                   f"{len(thumb_rows)} of the {n} points (a seeded, class-stratified sample, ringed) have a thumbnail "
                   "and neighbours; the others show their label and index.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="lm-note" id="lm-count">{n} points. {html.escape(note)}</p>
<p class="lm-note" id="lm-thumbs">{html.escape(thumbs_note)}</p>
<p class="lm-note">Hover a point for its image; click it for its nearest neighbours in the embedding
space; click a legend entry to hide or show a class.</p>
{_controls(payload["columns"])}
<script type="application/json" id="lm-data">{data_json}</script>
<div id="lm-layout"><div id="lm-plot">{plot}</div><div id="lm-neighbours"><p class="lm-note">Click a point
to list its nearest neighbours here.</p></div></div>
<div id="lm-tooltip"></div>
</body></html>
"""
