"""``compare.html``: two to six runs on the same images, their maps side by side and linked.

* Each run's map, aligned to the first run's where the maps allow it: a rotation, reflection,
  uniform scale and shift (least-squares Procrustes) changes nothing a 2-D map means, so every map
  is turned onto the first; maps fitted together (aligned UMAP) arrive aligned and are left as they
  are. The titles say which.
* Linked views: hovering an image rings it in every map and shows its thumbnail; a lasso or box
  selection in one map selects the same images in all, and lists their classes, thumbnails and
  labels.
* Colour by class, or by a per-image difference between the first run (A) and another: right in A
  and wrong in B (and the reverse) by the k-NN classifier, the share of k nearest neighbours kept,
  or the change in any per-image score.
* The numbers beside the maps (made by the caller): the paired differences with intervals and
  corrected p-values, and the similarity panel of each pair.

Every point is drawn (WebGL above :data:`latentmap.interactive.WEBGL_ABOVE` points), coordinates
as base64 float32; thumbnails for a class-stratified sample, as many as the page's budget holds.
The page needs no network and no other file; it opens inside MLflow's artifact view.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace

import numpy as np

from latentmap.errors import ConfigError
from latentmap.interactive import _base64, script_json
from latentmap.stats import interval_text as _interval
from latentmap.stats import number, p_text

MAX_RUNS = 6
LETTERS = "ABCDEF"
# A pair's k-NN outcome per image: (code, what the key says, colour); -1: not scored.
OUTCOMES = ((0, "right in both", "#c7d9c7"), (1, "right in {a}, wrong in {b}", "#1f77b4"),
            (2, "wrong in {a}, right in {b}", "#ff7f0e"), (3, "wrong in both", "#9a9a9a"))
# An image a column has no value for (outside the metric sample, say): a plain grey at half size.
NOT_SCORED = "#c9c9c9"


@dataclass
class Column:
    """One way to colour the points: ``kind`` is ``outcome`` (codes of :data:`OUTCOMES`), ``share``
    (0..1, e.g. neighbours kept) or ``change`` (a signed difference, B - A); NaN or -1: not scored."""

    label: str
    kind: str
    values: np.ndarray  # (N,)
    pair: tuple[str, str] = ("A", "B")


@dataclass
class Map:
    """One run on the page: its title (what varied, which run) and its (N, 2) coordinates."""

    title: str
    coords: np.ndarray
    texts: list[tuple[str, float, float]] | None = None  # labelled places: an image-text model's class prompts


def check_same_images(names: list[str], fingerprints: list[str | None], indices: list[np.ndarray]) -> None:
    """Refuse, in one line, runs that did not map the same images (dataset fingerprint and indices)."""
    if not 2 <= len(names) <= MAX_RUNS:
        raise ConfigError(f"compare.html shows 2 to {MAX_RUNS} runs, got {len(names)}: pass 2 to {MAX_RUNS} runs")
    for name, fingerprint, rows in zip(names[1:], fingerprints[1:], indices[1:]):
        if fingerprint != fingerprints[0] or not np.array_equal(rows, indices[0]):
            shared = len(np.intersect1d(rows, indices[0]))
            raise ConfigError(
                f"runs {names[0]} and {name} did not map the same images ({len(indices[0])} and {len(rows)}, "
                f"{shared} dataset indices shared{'' if fingerprint == fingerprints[0] else ', other datasets'}): "
                "compare runs made with the same dataset settings and seed")


def procrustes_fit(moving: np.ndarray, reference: np.ndarray):
    """The rotation/reflection, uniform scale and shift taking (N, 2) ``moving`` closest to
    ``reference`` (least squares), as a function of (P, 2) points."""
    from scipy.linalg import orthogonal_procrustes

    moving_centre, reference_centre = moving.mean(0), reference.mean(0)
    centred, target = moving - moving_centre, reference - reference_centre
    rotation, singular_sum = orthogonal_procrustes(centred, target)
    scale = singular_sum / max(float(np.sum(centred**2)), 1e-12)
    return lambda points: (np.asarray(points, np.float64) - moving_centre) @ rotation * scale + reference_centre


def procrustes_align(moving: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``moving`` (N, 2) rotated/reflected, scaled and shifted onto ``reference`` (least squares)."""
    return procrustes_fit(moving, reference)(moving)


def aligned(maps: list[Map], already: bool = False) -> list[Map]:
    """The maps, each after the first Procrustes-aligned onto it with its labelled places
    (``already``: fitted together, e.g. aligned UMAP, and left as they are); the titles say which."""
    if already:
        return [replace(m, title=f"{m.title} (aligned UMAP)") for m in maps]
    first = np.asarray(maps[0].coords, np.float64)
    out = [maps[0]]
    for m in maps[1:]:
        turn = procrustes_fit(np.asarray(m.coords, np.float64), first)
        texts = None
        if m.texts:
            placed = turn(np.array([[x, y] for _, x, y in m.texts]))
            texts = [(label, float(x), float(y)) for (label, _, _), (x, y) in zip(m.texts, placed)]
        out.append(Map(f"{m.title} (Procrustes-aligned to A)", turn(m.coords).astype(np.float32), texts))
    return out


def outcome(correct_a: np.ndarray, correct_b: np.ndarray) -> np.ndarray:
    """(N,) int8 codes of :data:`OUTCOMES` from two (N,) 0/1 arrays (NaN: not scored, -1)."""
    codes = np.full(len(correct_a), -1, np.int8)
    scored = np.isfinite(correct_a) & np.isfinite(correct_b)
    a, b = correct_a[scored] > 0.5, correct_b[scored] > 0.5
    codes[scored] = np.where(a & b, 0, np.where(a, 1, np.where(b, 2, 3)))
    return codes


def neighbours_kept(space_a: np.ndarray, space_b: np.ndarray, k: int, distance: str) -> np.ndarray:
    """(n,) for each image, the share of its k nearest neighbours in A that are among its k nearest
    in B (each in its own embedding space, by ``distance``)."""
    from latentmap import neighbours

    found_a, _ = neighbours.nearest(space_a, k, metric=distance)
    found_b, _ = neighbours.nearest(space_b, k, metric=distance)
    both = np.sort(np.concatenate([found_a, found_b], axis=1), axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(axis=1) / k


# Per-image scores worth a colour of their own (the k-NN outcome is its own column; a per-image
# score of the balanced accuracy is a weighted copy of the probe's correctness).
_SKIP = {"index", "label", "knn_acc_hd", "probe_balanced_acc"}


def differences(embeddings: list[np.ndarray], scores: list, distance: str, k: int) -> list[Column]:
    """The per-image differences of each run against the first (A): the k-NN outcome pair (right in
    A and wrong in B, ...), the share of k nearest neighbours kept (embedding spaces, ``distance``)
    and the change B - A of every per-image score both runs have, on the images both scored.

    Args:
        embeddings: each run's (N, D) embeddings, rows in the page's order.
        scores: each run's per-image score table (``tables/per_image.csv``: a row per scored image,
            ``index`` its dataset index) with ``row``, its row on the page; or None.
        k: the neighbourhood size (the runs' ``metrics.k``).
    """
    import pandas as pd

    n = len(embeddings[0])
    columns = []
    for j in range(1, len(embeddings)):
        pair = ("A", LETTERS[j])
        a, b = scores[0], scores[j]
        if a is not None and b is not None:
            both = pd.merge(a, b.drop(columns="row"), on="index", suffixes=("_a", "_b"))
            both = both.rename(columns={"row": "row_a"})
            if "knn_acc_hd_a" in both and "knn_acc_hd_b" in both:
                codes = np.full(n, -1, np.int8)
                codes[both["row_a"]] = outcome(both["knn_acc_hd_a"].to_numpy(float),
                                               both["knn_acc_hd_b"].to_numpy(float))
                columns.append(Column(f"k-NN right or wrong, A vs {pair[1]}", "outcome", codes, pair))
            for name in [c for c in a.columns if c not in _SKIP and c != "row" and c in b.columns]:
                change = np.full(n, np.nan, np.float32)
                change[both["row_a"]] = both[f"{name}_b"].to_numpy(float) - both[f"{name}_a"].to_numpy(float)
                if not np.any(np.nan_to_num(change) != 0):  # the same in both (one embedding, two maps): no colouring
                    continue
                columns.append(Column(f"change in {name}, {pair[1]} - A", "change", change, pair))
            scored = np.sort(both["row_a"].to_numpy())
        else:
            scored = np.arange(n)
        kept = np.full(n, np.nan, np.float32)
        if len(scored) > k + 1:
            kept[scored] = neighbours_kept(np.asarray(embeddings[0])[scored], np.asarray(embeddings[j])[scored],
                                           k, distance)
            columns.insert(len(columns) - sum(c.pair == pair and c.kind == "change" for c in columns),
                           Column(f"{k} nearest neighbours kept, A vs {pair[1]}", "share", kept, pair))
    return columns


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 12px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; } h2 { font-size: 15px; margin: 18px 0 6px; }
.lm-note { font-size: 13px; color: #555; margin: 2px 0; }
#lm-controls { font-size: 13px; margin: 6px 0; display: flex; flex-wrap: wrap; gap: 12px; align-items: center; }
#lm-key { font-size: 12px; display: flex; flex-wrap: wrap; gap: 4px 10px; }
.lm-swatch { display: inline-block; width: 10px; height: 10px; margin-right: 3px; border-radius: 50%; }
.lm-pairnote { color: #666; font-style: italic; }
.lm-swatch.lm-none { width: 5px; height: 5px; margin: 0 5px 2px 3px; background: __NONE__; }
#lm-maps { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 10px; }
.lm-cell { min-width: 0; border: 1px solid #e4e4e4; position: relative; }
.lm-ring { position: absolute; display: none; width: 20px; height: 20px; box-sizing: border-box; border-radius: 50%;
  border: 2.5px solid #000; pointer-events: none; z-index: 5; }
.lm-title { font-size: 12px; font-weight: 600; padding: 4px 6px 0; overflow-wrap: anywhere; }
.lm-map { height: clamp(300px, 34vw, 520px); }
#lm-selection { font-size: 12px; margin: 8px 0; min-height: 20px; }
#lm-selection .lm-grid { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 6px; }
#lm-selection figure { margin: 0; width: 64px; }
#lm-selection figcaption { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#lm-selection figcaption .lm-v { white-space: normal; display: block; }
#lm-selection img, #lm-tooltip img { width: 64px; height: 64px; image-rendering: pixelated; display: block;
  object-fit: contain; }
#lm-tooltip { position: fixed; display: none; pointer-events: none; background: #fff; border: 1px solid #888;
  border-radius: 4px; padding: 6px; font-size: 12px; z-index: 10; box-shadow: 0 2px 6px rgba(0,0,0,.25); }
.lm-nothumb { width: 64px; height: 64px; display: flex; align-items: center; justify-content: center;
  background: #eee; color: #777; font-size: 10px; text-align: center; }
table { border-collapse: collapse; font-size: 12px; display: block; overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } td.name, th.name { text-align: left; }
/* A pair's tables need about 560 px: two pairs a row from about 1,150 px, one below that. */
#lm-numbers { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 560px), 1fr)); gap: 12px; }
#lm-numbers > div { min-width: 0; }
"""

_SCRIPT = """
(function () {
  requestAnimationFrame(() => { window.lmFirstDraw = performance.now(); });
  const lm = JSON.parse(document.getElementById('lm-data').textContent);
  const decode = (text, Type) => {
    if (text === null) return null;
    const bin = atob(text), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return new Type(bytes.buffer);
  };
  const esc = (s) => String(s).replace(/[&<>"]/g,
    (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  // Text for Plotly, which reads tags but decodes only a few named entities (not &quot;)
  const plotlyText = (s) => String(s).replace(/[&<>]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;'}[c]));
  const n = lm.n;
  const labels = decode(lm.label, lm.label_bytes === 2 ? Uint16Array : Uint8Array);
  const indices = decode(lm.index, Int32Array);
  const indexOf = (row) => (indices ? indices[row] : row);
  const labelOf = (row) => lm.classes[labels[row]];
  const sides = lm.sides.map((s) => ({title: s.title, x: decode(s.x, Float32Array), y: decode(s.y, Float32Array),
                                      texts: s.texts}));
  const columns = {};
  for (const [name, spec] of Object.entries(lm.columns)) {
    columns[name] = decode(spec.data, spec.kind === 'outcome' ? Int8Array : Float32Array);
  }
  const image = (row) => (lm.thumbs[row] ? `<img src="${lm.thumbs[row]}" alt="image ${indexOf(row)}">`
                                         : '<div class="lm-nothumb">no thumbnail</div>');
  const viridis = (t) => {
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2);
    const f = x - i, c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };
  const diverging = (t) => {  // -1 blue, 0 light grey, 1 red
    const u = Math.min(Math.max(t, -1), 1), a = Math.abs(u), far = u < 0 ? [33, 102, 172] : [178, 24, 43];
    const c = [225, 225, 225].map((v, j) => Math.round(v + a * (far[j] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };
  let current = 'class', range = 1;
  // Not scored (outside the metric sample, or no value): a grey point at half size, so that it does
  // not read as a scored image with no change (the ramp's light-grey middle) and does not cover one.
  const NONE = '__NONE__';
  const scored = (name, row) => {
    const spec = lm.columns[name], v = columns[name][row];
    return spec.kind === 'outcome' ? v >= 0 : Number.isFinite(v);
  };
  const valueText = (name, row) => {
    const spec = lm.columns[name], v = columns[name][row];
    if (spec.kind === 'outcome') return v < 0 ? 'not scored' : spec.outcomes[v][0];
    if (!Number.isFinite(v)) return 'not scored';
    return spec.kind === 'share' ? `${Math.round(100 * v)}%` : (v > 0 ? '+' : '') + v.toPrecision(3);
  };
  const colourOf = (name, row) => {
    if (name === 'class') return lm.class_colours[labels[row]];
    const spec = lm.columns[name], v = columns[name][row];
    if (spec.kind === 'outcome') return v < 0 ? NONE : spec.outcomes[v][1];
    if (!Number.isFinite(v)) return NONE;
    return spec.kind === 'share' ? viridis(v) : diverging(v / range);
  };
  const colours = (name) => {
    if (name !== 'class' && lm.columns[name].kind === 'change') {
      const values = Array.from(columns[name]).filter(Number.isFinite).map(Math.abs).sort((a, b) => a - b);
      range = Math.max(values.length ? values[Math.floor(0.99 * (values.length - 1))] : 1, 1e-12);
    }
    const out = new Array(n);
    for (let row = 0; row < n; row++) out[row] = colourOf(name, row);
    return out;
  };
  const key = (name) => {
    const box = document.getElementById('lm-key');
    const sw = (c, text) => `<span><span class="lm-swatch" style="background:${c}"></span>${esc(text)}</span>`;
    if (name === 'class') {
      box.innerHTML = lm.classes.slice(0, 30).map((c, i) => sw(lm.class_colours[i], c)).join('') +
        (lm.classes.length > 30 ? `<span>... ${lm.classes.length} classes</span>` : '');
      return;
    }
    const spec = lm.columns[name];
    const none = `<span><span class="lm-swatch lm-none"></span>not scored</span>`;
    if (spec.kind === 'outcome') box.innerHTML = spec.outcomes.map(([text, c]) => sw(c, text)).join('') + none;
    else if (spec.kind === 'share') {
      box.innerHTML = sw(viridis(0), '0%') + sw(viridis(0.5), '50%') + sw(viridis(1), `100% ${spec.label}`) + none;
    } else {
      box.innerHTML = sw(diverging(-1), `${(-range).toPrecision(3)} (lower in ${spec.pair[1]})`) +
        sw(diverging(0), '0') + sw(diverging(1), `+${range.toPrecision(3)} (higher in ${spec.pair[1]})`) + none;
    }
    if (sides.length > 2) {  // a pair's values on every map, the third's too: said, not left to guess
      box.innerHTML += `<span class="lm-pairnote">colours: ${esc(spec.pair[0])} vs ${esc(spec.pair[1])}, on ` +
        'every map, each image where that map places it</span>';
    }
  };
  const plots = sides.map((s, i) => document.getElementById(`lm-map-${i}`));
  const size = n < 2000 ? 6 : n < 50000 ? 3 : 2, small = Math.max(1, size / 2);
  const type = n > lm.webgl_above ? 'scattergl' : 'scatter';
  const tip = document.getElementById('lm-tooltip');
  let selected = [], selectedFrom = null;
  // The ring is a layout shape of a fixed pixel size: moving it redraws no trace (at 100,000 points
  // a restyle redraws the WebGL points, seconds a hover).
  // The ring is a page element over each map, placed by the map's axes: no Plotly call, so a hover
  // costs the same at 100,000 points as at 100 (a restyle or relayout redraws the WebGL points).
  const rings = plots.map((gd) => {
    const ring = document.createElement('div');
    ring.className = 'lm-ring';
    gd.parentElement.appendChild(ring);
    return ring;
  });
  const ringAt = (row) => plots.forEach((gd, i) => {
    const ring = rings[i];
    if (row === null) { ring.style.display = 'none'; delete ring.dataset.x; delete ring.dataset.y; return; }
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, x = sides[i].x[row], y = sides[i].y[row];
    ring.style.left = (gd.offsetLeft + xa._offset + xa.l2p(x) - 10) + 'px';
    ring.style.top = (gd.offsetTop + ya._offset + ya.l2p(y) - 10) + 'px';
    ring.style.display = 'block';
    ring.dataset.x = x;
    ring.dataset.y = y;
  });
  const api = {
    plots,
    hover(row, clientX = 20, clientY = 20) {
      ringAt(row);
      tip.dataset.row = row;
      tip.innerHTML = image(row) + `<div class="lm-label">${esc(labelOf(row))}</div><div>index ${indexOf(row)}</div>` +
        (current === 'class' ? '' :
         `<div class="lm-value">${esc(lm.columns[current].label)}: ${esc(valueText(current, row))}</div>`);
      tip.style.left = (clientX + 14) + 'px';
      tip.style.top = (clientY + 14) + 'px';
      tip.style.display = 'block';
      document.body.dataset.hovered = row;
    },
    unhover() { ringAt(null); tip.style.display = 'none'; delete document.body.dataset.hovered; },
    select(rows, from = null) {
      selected = rows;
      selectedFrom = from;
      plots.forEach((gd) => Plotly.restyle(gd, {selectedpoints: [rows.length ? rows : null]}, [0]));
      const box = document.getElementById('lm-selection');
      document.body.dataset.selected = rows.length;
      if (!rows.length) {
        box.innerHTML = '<p class="lm-note">Draw a lasso or box in any map to select images in all of them.</p>';
        return;
      }
      const counts = {};
      rows.forEach((r) => { counts[labelOf(r)] = (counts[labelOf(r)] || 0) + 1; });
      const classes = Object.entries(counts).sort((a, b) => b[1] - a[1])
        .map(([c, k]) => `${esc(c)} ${k}`).join(', ');
      const shown = rows.filter((r) => lm.thumbs[r]).slice(0, 48);
      box.innerHTML = `<b>${rows.length} images selected</b>${from === null ? '' : ` in map ${'ABCDEF'[from]}`}, ` +
        `highlighted in every map: ${classes}` +
        (current === 'class' ? '' : ` &middot; coloured by ${esc(lm.columns[current].label)}`) +
        `<div class="lm-grid">${shown.map((r) => `<figure data-row="${r}">${image(r)}<figcaption>` +
          `${esc(labelOf(r))}<br>#${indexOf(r)}` +
          (current === 'class' ? '' : `<span class="lm-v">${esc(valueText(current, r))}</span>`) +
          '</figcaption></figure>').join('')}</div>` +
        (shown.length === rows.length ? '' : `<p class="lm-note">${shown.length ?
          `${shown.length} of them shown, those with a thumbnail` : 'none of them has a thumbnail'}</p>`);
    },
    colour(name) {
      current = name;
      const all = colours(name);
      const sizes = name === 'class' ? size : Array.from({length: n}, (_, row) => scored(name, row) ? size : small);
      plots.forEach((gd) => Plotly.restyle(gd, {'marker.color': [all], 'marker.size': [sizes]}, [0]));
      key(name);
      document.body.dataset.colourBy = name;
      if (selected.length) api.select(selected, selectedFrom);
    },
  };
  window.lmCompare = api;
  sides.forEach((s, i) => {
    const gd = plots[i];
    Plotly.newPlot(gd, [
      {type, x: s.x, y: s.y, mode: 'markers', hoverinfo: 'none', showlegend: false,
       marker: {size, color: colours('class'), opacity: 0.85}, unselected: {marker: {opacity: 0.1}}},
      ...(s.texts.length ? [{type: 'scatter', mode: 'markers+text', hoverinfo: 'skip', showlegend: false,
        x: s.texts.map((t) => t[1]), y: s.texts.map((t) => t[2]), text: s.texts.map((t) => plotlyText(t[0])),
        textposition: 'top center', textfont: {size: 11, color: '#111'}, name: 'class prompts (text)',
        marker: {size: 12, symbol: 'star', color: '#111', line: {width: 1, color: '#fff'}}}] : []),
    ], {margin: {l: 32, r: 8, t: 26, b: 24}, dragmode: 'lasso', hovermode: 'closest', plot_bgcolor: 'white',
        xaxis: {showgrid: false, zeroline: false}, autosize: true,
        yaxis: {showgrid: false, zeroline: false, scaleanchor: 'x', scaleratio: 1}},  // equal units: the map's shape
      {displaylogo: false, responsive: true});
    gd.on('plotly_hover', (event) => {
      const point = event.points.find((p) => p.curveNumber === 0);
      if (!point) return;
      const e = event.event || {clientX: 20, clientY: 20};
      api.hover(point.pointIndex, e.clientX, e.clientY);
    });
    gd.on('plotly_unhover', () => api.unhover());
    gd.on('plotly_selected', (event) => {
      if (!event) return;
      api.range = event.range || null;  // a box's corners in map units (for scripts and tests)
      api.select(event.points.filter((p) => p.curveNumber === 0).map((p) => p.pointIndex), i);
    });
    gd.on('plotly_deselect', () => api.select([]));
  });
  key('class');
  api.select([]);
  const box = document.getElementById('lm-colour');
  box.addEventListener('change', () => api.colour(box.value));
})();
"""
_STYLE, _SCRIPT = (text.replace("__NONE__", NOT_SCORED) for text in (_STYLE, _SCRIPT))


def page(maps: list[Map], labels: np.ndarray | None, class_names: list[str] | None, indices: np.ndarray,
         columns: list[Column], thumbnails: dict[int, str], numbers: str, title: str, note: str,
         colors: np.ndarray) -> str:
    """The page.

    Args:
        maps: the runs' maps (already aligned), A first.
        labels: (N,) class ids, or None for an unlabelled set.
        indices: (N,) dataset index of each row.
        columns: the per-image differences to colour by.
        thumbnails: row -> PNG data URI, for the rows that have one.
        numbers: HTML of the tables beside the maps (escaped by the caller).
        colors: (C, 4) RGBA class colours.
    """
    from plotly.offline import get_plotlyjs

    from latentmap.interactive import WEBGL_ABOVE

    n = len(indices)
    classes = list(class_names) if labels is not None else ["(unlabelled)"]
    label_ids = np.asarray(labels if labels is not None else np.zeros(n), dtype=np.int64)
    label_type = np.uint8 if len(classes) <= 256 else np.uint16
    hexes = ["#{:02x}{:02x}{:02x}".format(*(int(round(255 * v)) for v in c[:3])) for c in colors[: len(classes)]]
    payload = {
        "n": n, "classes": classes, "class_colours": hexes if labels is not None else ["#1f77b4"],
        "label": _base64(label_ids.astype(label_type)), "label_bytes": np.dtype(label_type).itemsize,
        "index": None if np.array_equal(indices, np.arange(n)) else _base64(np.asarray(indices).astype(np.int32)),
        "sides": [{"title": m.title, "x": _base64(np.asarray(m.coords[:, 0], np.float32)),
                   "y": _base64(np.asarray(m.coords[:, 1], np.float32)), "texts": m.texts or []} for m in maps],
        "columns": {f"c{i}": {"label": c.label, "kind": c.kind, "pair": list(c.pair),
                              "data": _base64(np.asarray(c.values, np.int8 if c.kind == "outcome" else np.float32)),
                              "outcomes": [(text.format(a=c.pair[0], b=c.pair[1]), colour)
                                           for _, text, colour in OUTCOMES]}
                    for i, c in enumerate(columns)},
        "thumbs": {int(row): uri for row, uri in thumbnails.items()},
        "webgl_above": WEBGL_ABOVE,
    }
    options = '<option value="class">class</option>' + "".join(
        f'<option value="c{i}">{html.escape(c.label)}</option>' for i, c in enumerate(columns))
    data_json = script_json(payload)
    divs = "".join(f'<div class="lm-cell"><div class="lm-title">{LETTERS[i]}: {html.escape(m.title)}</div>'
                   f'<div class="lm-map" id="lm-map-{i}"></div></div>' for i, m in enumerate(maps))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="lm-note" id="lm-count">{n} images in each of {len(maps)} maps, every one drawn. {html.escape(note)}</p>
<p class="lm-note">Hover an image to ring it in every map; draw a lasso or box in any map to select the same
images in all (double-click a map to clear); {len(thumbnails)} images have a thumbnail.</p>
<div id="lm-controls"><label>colour by <select id="lm-colour">{options}</select></label><div id="lm-key"></div></div>
<div id="lm-maps">{divs}</div>
<div id="lm-selection"></div>
<h2>The numbers</h2>
<div id="lm-numbers">{numbers}</div>
<div id="lm-tooltip"></div>
<script type="application/json" id="lm-data">{data_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def family_note(table) -> str:
    """What Holm's family of ``compare``'s table holds, in words: the metrics tested, those equal in
    both runs on every half-sample (``same_input``: no test), and any other left without a test."""
    tested = int(table["p_value"].notna().sum())
    same = table["same_input"].astype(bool) if "same_input" in table else table["p_value"].isna()
    equal = int(same.sum())
    other = len(table) - tested - equal
    note = (f"p-values adjusted by Holm's method over the {tested} metric{'s' if tested != 1 else ''} tested in "
            "this table (one family)" if tested else "no metric was tested")
    if equal:
        note += (f"; {equal} equal in both runs on every half-sample (the same input, e.g. one embedding under "
                 "two maps) not tested")
    if other:
        note += f"; {other} without a test (too few half-samples gave a value)"
    return note


# What the calibration measured for two maps held fixed (docs/calibration.md, "t-SNE and UMAP maps").
HELD_FIXED_RATE = ("on the calibration's mixture, two equally good runs with their maps held fixed were called "
                   "different on silhouette_2d at p < 0.05 in 15% of draws with UMAP maps, 20% with scikit-learn's "
                   "t-SNE and 11% with PCA; with the maps refitted (metrics.refit_map=true in both runs), at most 4% "
                   "on every map metric")


def tested(table) -> list[str]:
    """The metrics of a paired table (``commands.compare.compare``'s) that were tested: those with a
    p-value, as :func:`family_note` counts them (not those equal in both runs on every half-sample)."""
    return list(table.loc[table["p_value"].notna(), "metric"])


def both_held_fixed(metrics: list[str]) -> str:
    """The sentence for two runs that both held their 2-D maps fixed on the half-samples: their
    paired map metrics (``metrics``) leave both fits out."""
    from latentmap.settings import REFIT_MAPS_UP_TO

    return (f"Both maps were held fixed on the half-samples (metrics.refit_map=false, or the default where a run "
            f"scored more than {REFIT_MAPS_UP_TO:,} images, its half-samples were too few for the reducer's "
            f"settings, or it was made before 2026-12-07), so the intervals and p-values of the map "
            f"metrics ({', '.join(metrics)}) leave out each map's own fit: {HELD_FIXED_RATE}.")


def map_handling(tag_a: str | None, tag_b: str | None, letters: tuple[str, str] = ("A", "B"),
                 metrics: list[str] | None = None) -> str:
    """A sentence where the two runs' map metrics are not paired like with like (``logged.map_refit``:
    "true" where each half-sample's map metrics came from a map refitted on that half, "false"
    where the map was held fixed, None where neither the tag nor the run's tables say), else "":
    where they resampled their 2-D maps differently, their paired map metrics (``metrics``, the map
    metrics among them: the tested ones) set one map's refitting against the other's images alone;
    where both held their maps fixed, the test leaves both fits out (:func:`both_held_fixed`)."""
    from latentmap.resampling import MAP_METRICS

    shown = [m for m in (metrics if metrics is not None else MAP_METRICS) if m in MAP_METRICS]
    if not shown or (tag_a == tag_b and tag_a != "false"):
        return ""
    if tag_a == tag_b:
        return both_held_fixed(shown)

    def handled(letter: str, tag: str | None) -> str:
        return {"true": f"{letter}'s map refitted on each half-sample", "false": f"{letter}'s map held fixed"}.get(
            tag, f"{letter}'s map, whose handling its run does not record")

    return (f"The map metrics ({', '.join(shown)}) pair {handled(letters[0], tag_a)} with "
            f"{handled(letters[1], tag_b)}, so their intervals carry the refitting of one map at most "
            "(metrics.refit_map; set it alike in both runs to compare like with like).")


def _p(value: float) -> str:
    return html.escape(p_text(value))


def numbers_html(pair: tuple[str, str], names: tuple[str, str], table, panel: dict | None, confidence: float,
                 maps_note: str = "") -> str:
    """One pair's tables: the paired differences (``commands.compare.compare``'s table, or None where
    the runs cannot be paired), with ``maps_note`` (:func:`map_handling`) under them, and the
    similarity panel (``measures.panel``)."""
    a, b = pair
    if table is None:  # e.g. a study's runs scored on other half-samples: no paired test between them
        out = (f"<div><h3 style='font-size:13px'>{a} and {b}: {html.escape(names[0])} and {html.escape(names[1])}"
               "</h3><p class='lm-note'>No paired differences for this pair (runs scored on other half-samples, "
               "other metrics.bootstrap or cv_seed, cannot be paired).</p>")
        return out + _panel_html(a, b, panel, confidence) + "</div>"
    rows = "".join(
        f'<tr data-metric="{html.escape(r.metric)}"><td class="name">{html.escape(r.metric)}</td><td>{number(r.a)}</td>'
        f'<td>{number(r.b)}</td><td data-value="{float(r.difference)!r}">'
        f'{_interval(r.difference, r.lo, r.hi, signed=True)}</td>'
        f"<td>{_p(r.p_value)}</td><td>{_p(r.p_holm)}</td></tr>" for r in table.itertuples())
    out = (f"<div><h3 style='font-size:13px'>{a} - {b}: {html.escape(names[0])} minus {html.escape(names[1])}</h3>"
           f"<table class='lm-differences' data-pair='{a}{b}'><tr><th class='name'>metric</th><th>{a}</th><th>{b}</th>"
           f"<th>{a} - {b} [{confidence:.0%} interval]</th><th>p</th><th>p (Holm)</th></tr>{rows}</table>"
           f"<p class='lm-note'>Paired over the same images and half-samples; p (Holm): "
           f"{html.escape(family_note(table))}.</p>" +
           (f"<p class='lm-note lm-maps'>{html.escape(maps_note)}</p>" if maps_note else ""))
    return out + _panel_html(a, b, panel, confidence) + "</div>"


def _panel_html(a: str, b: str, panel: dict | None, confidence: float) -> str:
    """The similarity panel of a pair (``measures.panel``), or nothing without one."""
    if not panel:
        return ""
    cells = "".join(
        f'<tr data-measure="{html.escape(name)}"><td class="name">{html.escape(name)}</td>'
        f"<td>{_interval(found.value, found.lo, found.hi)}</td><td>{number(found.null_mean)}</td>"
        f"<td>{_p(found.p_value)}</td></tr>" for name, found in panel.items())
    first = next(iter(panel.values()))
    return (f"<table class='lm-panel' data-pair='{a}{b}'><tr><th class='name'>similarity of {a} and {b}</th>"
            f"<th>value [{confidence:.0%} interval]</th><th>null mean</th><th>p (permutation)</th></tr>{cells}</table>"
            f"<p class='lm-note'>The similarity panel of the two embeddings on {first.n} images.</p>")


def _texts(client, run_id: str) -> list[tuple[str, float, float]] | None:
    """A run's class prompts placed in its map (``tables/zeroshot_text_coords.csv``), or None."""
    import tempfile

    import pandas as pd
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            # the class names as written: not guessed as numbers ("007") or missing ("NA", "None")
            placed = pd.read_csv(client.download_artifacts(run_id, "tables/zeroshot_text_coords.csv", folder),
                                 dtype={"class": str}, keep_default_na=False)
        except (MlflowException, OSError):
            return None
    return [(str(row["class"]), float(row["x"]), float(row["y"])) for _, row in placed.iterrows()]


def for_runs(client, run_ids: list[str], tracking_uri: str, confidence: float,
             tables: dict[str, object] | None = None, titles: list[str] | None = None, note: str = "") -> str:
    """compare.html for logged runs (2 to 6, the same images): each run's map aligned to the first,
    the per-image differences against the first, and ``tables`` (run id of B -> the paired table of
    A against it, ``commands.compare.compare``) beside the similarity panel of each pair. The page's
    budgets (thumbnails, megabytes) and the panel's settings are the first run's."""

    from latentmap import logged, measures

    runs = [logged.load(run_id, tracking_uri) for run_id in run_ids]
    infos = [client.get_run(run_id) for run_id in run_ids]
    names = [info.info.run_name or run_id[:8] for info, run_id in zip(infos, run_ids)]
    check_same_images(names, [info.data.tags.get("dataset_fingerprint") for info in infos],
                      [run.indices for run in runs])
    first = runs[0]
    cfg = first.config
    seed = int(cfg.seed)
    distance = str(cfg.metrics.get("distance", "cosine"))  # logged before the key: cosine
    k = int(cfg.metrics.k)
    labels = first.labels if first.labelled else None
    row_of = {int(index): row for row, index in enumerate(first.indices)}
    scores = []
    for run_id in run_ids:
        try:
            table, _ = logged.score_table(client, run_id)
            table["row"] = [row_of[int(i)] for i in table["index"]]
            scores.append(table)
        except ConfigError:
            scores.append(None)
    columns = differences([run.embeddings for run in runs], scores, distance, k)
    maps = aligned([Map(title, run.coords, _texts(client, run.run_id))
                    for title, run in zip(titles or names, runs)])

    study = cfg.study
    panel_rows = measures.subsample_rows(len(first.indices), int(study.null_images), seed)
    panel_k = min(int(study.k), max(1, len(panel_rows) // 4))
    numbers = []
    for j, run in enumerate(runs[1:], start=1):
        panel = None
        if len(panel_rows) > panel_k + 2:
            panel = measures.panel(np.asarray(first.embeddings)[panel_rows], np.asarray(run.embeddings)[panel_rows],
                                   panel_k, int(study.permutations), int(study.bootstrap),
                                   confidence, seed)
        table = (tables or {}).get(run.run_id)
        maps_note = "" if table is None else map_handling(logged.map_refit(client, run_ids[0]),
                                                          logged.map_refit(client, run.run_id), ("A", LETTERS[j]),
                                                          tested(table))
        numbers.append(numbers_html(("A", LETTERS[j]), (names[0], names[j]), table, panel, confidence, maps_note))

    title = "compare: " + "; ".join(f"{LETTERS[i]} = {name}" for i, name in enumerate(names))  # " · " is in names
    return with_thumbnails(maps, labels, first.class_names, first.indices, columns, "".join(numbers), title, note,
                           first.thumbnails, seed, float(cfg.plots.map_max_mb), int(cfg.plots.map_thumbnails))


def with_thumbnails(maps: list[Map], labels: np.ndarray | None, class_names: list[str] | None, indices: np.ndarray,
                    columns: list[Column], numbers: str, title: str, note: str, decode, seed: int, max_mb: float,
                    max_thumbnails: int) -> str:
    """:func:`page` with thumbnails (``decode(rows)``: their images) for a seeded, class-stratified
    sample of at most ``max_thumbnails`` images, as many as keep the page under ``max_mb`` megabytes
    (the runs' ``plots.map_thumbnails`` and ``plots.map_max_mb``); without any when the images
    cannot be read again."""
    import logging

    from latentmap import data, plots
    from latentmap.interactive import fit_thumbnails

    colors = plots.class_colors(len(class_names) if labels is not None else 1)
    bare = page(maps, labels, class_names, indices, columns, {}, numbers, title, note, colors)
    budget = int(max_mb * 1e6) - len(bare.encode()) - 4000
    order = data.balanced_order(labels, len(indices), seed)[:max_thumbnails]
    try:
        kept, uris = fit_thumbnails(order, decode, max(budget, 0), 24)
    except ConfigError as error:  # the images are gone or changed: the page without thumbnails
        logging.getLogger(__name__).warning("compare.html without thumbnails: %s", error)
        kept, uris = np.zeros(0, np.int64), []
    return page(maps, labels, class_names, indices, columns, dict(zip(kept.tolist(), uris)), numbers, title, note,
                colors)
