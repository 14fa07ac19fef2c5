"""``map.html``: the 2-D map as one self-contained page (Plotly, its JavaScript embedded).

* One trace per class, coloured as in the static plots; clicking a legend entry hides or shows
  the class (Plotly's own legend behaviour).
* Hovering a point shows a tooltip with its thumbnail, label, dataset index and coordinates.
* Clicking a point lists its k nearest neighbours in the embedding space (its geometry, cosine by
  default), with
  thumbnails; neighbours of another class are marked. Neighbours are searched among the points
  on the page.
* Above ``max_points`` the page shows a seeded, class-stratified subsample and says so.

Thumbnails are small PNG data URIs, so the page needs no network and no other file.
"""

from __future__ import annotations

import html
import json

import numpy as np

from latentmap.neighbours import png_data_uri

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 12px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; }
.lm-note { font-size: 13px; color: #555; margin: 2px 0; }
#lm-layout { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
#lm-plot { flex: 1 1 420px; min-width: 0; }

#lm-tooltip { position: fixed; display: none; pointer-events: none; background: #fff;
  border: 1px solid #888; border-radius: 4px; padding: 6px; font-size: 12px; z-index: 10;
  box-shadow: 0 2px 6px rgba(0,0,0,.25); }
#lm-tooltip img, #lm-neighbours img { width: 64px; height: 64px; image-rendering: pixelated;
  display: block; }
#lm-neighbours { flex: 0 1 300px; font-size: 12px; }
#lm-neighbours .lm-grid { display: flex; flex-wrap: wrap; gap: 6px; }
#lm-neighbours figure { margin: 0; padding: 2px; border: 2px solid transparent; }
#lm-neighbours figure.lm-wrong { border-color: #d62728; }
#lm-neighbours figcaption { max-width: 64px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; }
"""

_SCRIPT = """
(function () {
  const lm = JSON.parse(document.getElementById('lm-data').textContent);
  const gd = document.getElementById('{plot_id}');
  const tip = () => document.getElementById('lm-tooltip');  // looked up when used: parsed after this
  const panel = () => document.getElementById('lm-neighbours');
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]));
  const card = (row) => `<img src="${lm.thumbs[row]}" alt="image ${lm.index[row]}">` +
    `<div class="lm-label">${esc(lm.label[row])}</div><div class="lm-index">index ${lm.index[row]}</div>`;
  gd.on('plotly_hover', (event) => {
    const row = event.points[0].customdata;
    const box = tip();
    box.dataset.row = row;
    box.innerHTML = card(row) +
      `<div class="lm-xy">(${lm.x[row].toPrecision(4)}, ${lm.y[row].toPrecision(4)})</div>`;
    const e = event.event;
    box.style.left = (e.clientX + 14) + 'px';
    box.style.top = (e.clientY + 14) + 'px';
    box.style.display = 'block';
  });
  gd.on('plotly_unhover', () => { tip().style.display = 'none'; });
  gd.on('plotly_click', (event) => {
    const row = event.points[0].customdata;
    const side = panel();
    side.dataset.row = row;
    const items = lm.neighbours[row].map((n) => {
      const wrong = lm.label[n] !== lm.label[row];
      return `<figure class="${wrong ? 'lm-wrong' : 'lm-same'}" data-row="${n}">` +
        `<img src="${lm.thumbs[n]}" alt="image ${lm.index[n]}">` +
        `<figcaption>${esc(lm.label[n])}${wrong ? ' ✗' : ''}<br>#${lm.index[n]}</figcaption></figure>`;
    }).join('');
    side.innerHTML = `<h2 style="font-size:14px">${lm.k} nearest in the embedding space (${esc(lm.distance)})</h2>` +
      `<div class="lm-query">${card(row)}</div><div class="lm-grid">${items}</div>` +
      `<p class="lm-note">red: another class</p>`;
  });
})();
"""


def map_html(
    coords: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str] | None,
    indices: np.ndarray,
    thumbnails: list[np.ndarray],
    neighbours: np.ndarray,
    colors: np.ndarray,
    title: str,
    note: str = "",
    distance: str = "cosine",
) -> str:
    """The page for the points given (already subsampled, if at all).

    Args:
        coords: (P, 2) map coordinates of the points on the page.
        labels: (P,) class ids, or None for an unlabelled set.
        indices: (P,) dataset index of each point.
        thumbnails: P small (h, w, 3) uint8 images.
        neighbours: (P, k) rows (into these P points) of each point's nearest neighbours.
        colors: (C, 4) RGBA class colours.
        note: a line shown under the title (e.g. that the page shows a subsample).
        distance: the geometry the neighbours were found in (``metrics.distance``), named on the page.
    """
    import plotly.graph_objects as go

    names = [class_names[c] for c in labels] if labels is not None else ["(unlabelled)"] * len(coords)
    payload = {
        "x": coords[:, 0].astype(float).tolist(),
        "y": coords[:, 1].astype(float).tolist(),
        "label": names,
        "index": [int(i) for i in indices],
        "thumbs": [png_data_uri(t) for t in thumbnails],
        "neighbours": neighbours.astype(int).tolist(),
        "k": int(neighbours.shape[1]),
        "distance": distance,
    }
    figure = go.Figure()
    groups = range(len(class_names)) if labels is not None else [None]
    for c in groups:
        rows = np.flatnonzero(labels == c) if c is not None else np.arange(len(coords))
        if len(rows) == 0:
            continue
        r, g, b, _ = (255 * colors[c if c is not None else 0]).astype(int)
        figure.add_trace(go.Scatter(
            x=coords[rows, 0], y=coords[rows, 1], mode="markers", customdata=rows.tolist(), hoverinfo="none",
            name=class_names[c] if c is not None else "images",
            marker={"size": 7 if len(coords) < 2000 else 4, "color": f"rgb({r},{g},{b})", "opacity": 0.8},
        ))
    # The plot fills its frame's width (MLflow's artifact view is about 715 px wide), its legend at the
    # right inside it; the top margin keeps Plotly's toolbar above the legend's title.
    figure.update_layout(autosize=True, margin={"l": 40, "r": 10, "t": 36, "b": 30},
                         legend={"title": {"text": "class<br>(click to hide)"}, "itemsizing": "constant",
                                 "yanchor": "top", "y": 1.0},
                         plot_bgcolor="white", hovermode="closest")
    figure.update_xaxes(showgrid=False, zeroline=False)
    figure.update_yaxes(showgrid=False, zeroline=False)
    plot = figure.to_html(full_html=False, include_plotlyjs=True, div_id="lm-map", post_script=_SCRIPT,
                          default_width="100%", default_height="max(360px, min(760px, 80vh))",
                          config={"displaylogo": False, "responsive": True})
    data_json = json.dumps(payload).replace("</", "<\\/")  # cannot close the script element early
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="lm-note" id="lm-count">{len(coords)} points. {html.escape(note)}</p>
<p class="lm-note">Hover a point for its image; click it for its nearest neighbours in the embedding
space; click a legend entry to hide or show a class.</p>
<script type="application/json" id="lm-data">{data_json}</script>
<div id="lm-layout"><div id="lm-plot">{plot}</div><div id="lm-neighbours"></div></div>
<div id="lm-tooltip"></div>
</body></html>
"""
