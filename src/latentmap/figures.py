"""A run's figures: which rows each plot shows, their captions and subsamples, and where each
figure is written. The drawing itself is in :mod:`latentmap.plots` (arrays in, a Figure out);
this module decides what to draw and saves it into the run's artifact folder.

* ``plots/``: samples, scatter, thumbnails, centroids, centroid_distances_{2d,hd}, neighbours,
  outliers;
* ``tables/``: centroid_distances_{2d,hd}.csv;
* ``map.html``: the interactive map.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from latentmap import data, metrics, plots

log = logging.getLogger(__name__)


def thumbnail_arrays(dataset, rows: np.ndarray, max_pixels: int | None, size: int = 48,
                     intensity: tuple[float, float] | None = None) -> list[np.ndarray]:
    """Decode ``rows`` of ``dataset`` into small (h, w, 3) uint8 arrays for the plots, under the same
    pixel limit as extraction (``dataset.max_image_pixels``) and read as it reads them
    (``intensity``: ``dataset.intensity_range``)."""
    raw = data.undecoded(dataset).select(rows)[:]  # one query of the table: a dict of lists
    images = []
    with data.rgb_decoder(max_pixels, intensity) as decode:
        for record, index in zip(raw["image"], raw["index"]):
            image = decode(record, index)
            image.thumbnail((size, size))
            images.append(np.asarray(image))
    return images


def write_matrix(path: Path, matrix: np.ndarray, names: list[str]) -> None:
    """A square matrix with class names on both axes, as CSV."""
    import pandas as pd

    pd.DataFrame(matrix, index=names, columns=names).to_csv(path, float_format="%.6g")


def draw_all(tracker: Any, cfg: DictConfig, dataset, embeddings: np.ndarray, coords: np.ndarray,
             labels: np.ndarray | None, names: list[str] | None, title: str,
             outlier: dict[str, np.ndarray], space_title: str | None = None,
             audited: dict[str, np.ndarray] | None = None, texts: list[tuple[str, float, float]] | None = None,
             static_done=None) -> None:
    """Every figure of one run into ``tracker.path(...)``: the overview plots, the closer looks
    (neighbours, outliers) and map.html. ``title`` names the map (model, feature, reducer);
    ``space_title`` the embedding space alone (model, feature), for the figures found there;
    ``audited`` the audit's per-image columns, which map.html can colour and filter by; ``texts``
    labelled places in the map (an image-text model's class prompts), drawn in map.html.
    ``static_done()`` is called between the static figures and map.html (the run times each)."""
    import warnings

    missing = plots.missing_characters([*(names or []), title])
    if missing:
        log.warning("plots: %s", _missing_font_line(missing))
    with warnings.catch_warnings():
        if missing:  # said once above: not again by matplotlib, about 20 lines a figure
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from (current )?font", category=UserWarning)
        overview(tracker, cfg, dataset, embeddings, coords, labels, names, title)
        closer_look(tracker, cfg, dataset, embeddings, coords, labels, names, title, outlier, space_title or title,
                    {**(audited or {}), "outlier_score": outlier["outlier_score"]}, texts, static_done)


def _missing_font_line(missing: list[str]) -> str:
    """What the log says when the figures' fonts lack some characters of the class names or title:
    which, and the fix (a Noto package for their script, matplotlib's font cache rebuilt)."""
    import unicodedata

    import matplotlib

    east_asian = ("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "IDEOGRAPHIC")
    packages = sorted({"fonts-noto-cjk" if unicodedata.name(c, "").startswith(east_asian) else "fonts-noto-core"
                       for c in missing})
    shown = "".join(missing[:12]) + ("..." if len(missing) > 12 else "")
    return (f"{len(missing)} character{'s' if len(missing) > 1 else ''} of the class names or title ({shown}) "
            f"{'are' if len(missing) > 1 else 'is'} in none of the fonts the PNG figures use (matplotlib's "
            "font.family, then latentmap.plots.FALLBACK_FONTS where installed), so the figures draw boxes "
            "(map.html uses the browser's fonts); install a font that has them (on Debian or Ubuntu: apt install "
            f"{' '.join(packages)}) or name one in font.family in your matplotlibrc, then delete matplotlib's font "
            f"cache (fontlist-*.json in {matplotlib.get_cachedir()})")


def overview(tracker: Any, cfg: DictConfig, dataset, embeddings, coords, labels, names, title) -> None:
    """scatter, samples, thumbnails, centroids and the centroid-distance heatmaps and tables."""
    seed, reading = int(cfg.seed), data.reading_of(cfg.dataset)
    order = data.balanced_order(labels, len(coords), seed)
    figures = {"scatter": plots.scatter(coords, labels, names, title)}
    grid_rows = order[: int(cfg.plots.grid_images)]
    grid_captions = [plots.shortened(names[labels[r]], plots.CAPTION_LINE) if names else f"#{r}" for r in grid_rows]
    figures["samples"] = plots.sample_grid(thumbnail_arrays(dataset, grid_rows, **reading), grid_captions,
                                           f"samples · {cfg.dataset.get('name', '') or ''}".strip(" ·"))
    thumb_rows = np.sort(order[: int(cfg.plots.max_thumbnails)])
    if len(thumb_rows) < len(coords):
        log.info("thumbnails: drawing a class-stratified subsample of %d of %d points", len(thumb_rows), len(coords))
    figures["thumbnails"] = plots.thumbnails(
        coords[thumb_rows], thumbnail_arrays(dataset, thumb_rows, **reading),
        labels[thumb_rows] if labels is not None else None, names,
        f"{title} · {len(thumb_rows)} of {len(coords)} images",
    )
    if labels is not None:
        figures["centroids"] = plots.centroids(coords, labels, names, title)
        distance = str(cfg.metrics.distance)
        present = np.unique(labels)  # a class without images has no centroid: no row, no column
        shown = [names[c] for c in present]
        for space, points, metric in (("2d", coords, "euclidean"), ("hd", embeddings, distance)):
            matrix = metrics.centroid_distances(points, labels, len(names), metric)[np.ix_(present, present)]
            write_matrix(tracker.path(f"tables/centroid_distances_{space}.csv"), matrix, shown)
            where = "2-D map, euclidean" if space == "2d" else f"embedding space, {distance}"
            figures[f"centroid_distances_{space}"] = plots.heatmap(
                matrix, shown, f"class-centroid distances ({where})", f"{metric} distance")
    for name, figure in figures.items():
        figure.savefig(tracker.path(f"plots/{name}.png"), dpi=int(cfg.plots.dpi))


def closer_look(tracker: Any, cfg: DictConfig, dataset, embeddings, coords, labels, names, title,
                outlier: dict[str, np.ndarray], space_title: str | None = None,
                columns: dict[str, np.ndarray] | None = None, texts: list | None = None, static_done=None) -> None:
    """neighbours.png and outliers.png (found in the embedding space: titled ``space_title``) and
    map.html (the 2-D map: titled ``title``; ``columns``: per-image values it can colour by)."""
    space_title = space_title or title
    reading = data.reading_of(cfg.dataset)
    from latentmap import neighbours

    seed, k = int(cfg.seed), min(int(cfg.plots.neighbours), len(coords) - 1)
    distance = str(cfg.metrics.distance)
    order = data.balanced_order(labels, len(coords), seed)
    indices = data.column(dataset, "index")

    def caption(row: int) -> str:
        if labels is None:
            return f"#{indices[row]}"
        return f"{plots.shortened(names[labels[row]], plots.NAME_CHARACTERS['caption'])} #{indices[row]}"

    queries = order[: int(cfg.plots.neighbour_queries)]
    if len(queries):
        found, _ = neighbours.nearest(embeddings, k, queries, metric=distance)  # (Q, k)
        thumbs = thumbnail_arrays(dataset, np.concatenate([queries, found.ravel()]), **reading)
        query_images, neighbour_images = thumbs[: len(queries)], thumbs[len(queries):]
        figure = plots.neighbour_rows(
            query_images, [caption(q) for q in queries],
            [neighbour_images[i * k : (i + 1) * k] for i in range(len(queries))],
            [[caption(n) for n in row] for row in found],
            [[labels is not None and labels[n] != labels[q] for n in row] for q, row in zip(queries, found)],
            f"{space_title} · {k} nearest neighbours in the embedding space ({distance})"
            + _queries_note(labels, queries))
        figure.savefig(tracker.path("plots/neighbours.png"), dpi=int(cfg.plots.dpi))
    top = np.argsort(-outlier["outlier_score"], kind="stable")[: int(cfg.plots.outliers)]
    if len(top):
        captions = [f"{caption(r)}\nscore {outlier['outlier_score'][r]:.3f}"
                    + (f", {outlier['neighbour_disagreement'][r]:.0%} other" if labels is not None else "")
                    for r in top]
        plots.sample_grid(thumbnail_arrays(dataset, top, **reading), captions,
                          f"{space_title} · highest outlier scores (mean {distance} distance to {cfg.metrics.k} "
                          "nearest, embedding space)"
                          ).savefig(tracker.path("plots/outliers.png"), dpi=int(cfg.plots.dpi))
    if static_done is not None:
        static_done()
    if cfg.plots.map:
        map_page(tracker, cfg, dataset, embeddings, coords, labels, names, title, order, columns, texts)


def _queries_note(labels: np.ndarray | None, queries: np.ndarray) -> str:
    """What the queries of neighbours.png leave out, said in its title: the classes that have no
    query row when ``plots.neighbour_queries`` is below the number of classes (empty otherwise)."""
    present = 0 if labels is None else len(np.unique(labels))
    shown = 0 if labels is None else len(np.unique(labels[queries]))
    if labels is None or shown >= present:
        return ""
    return (f"\nquery images from {shown} of the {present} classes; "
            f"plots.neighbour_queries={len(queries)} sets how many rows")


def map_page(tracker: Any, cfg: DictConfig, dataset, embeddings, coords, labels, names, title: str,
             order: np.ndarray, columns: dict[str, np.ndarray] | None = None, texts: list | None = None) -> None:
    """map.html: every point (up to ``plots.map_max_points``), thumbnails for a class-stratified sample
    as large as ``plots.map_max_mb`` allows (at most ``plots.map_thumbnails``), each with its nearest
    neighbours among them."""
    from latentmap import audit, interactive, neighbours

    distance, reading = str(cfg.metrics.distance), data.reading_of(cfg.dataset)
    shown = np.sort(order[: int(cfg.plots.map_max_points)])
    note = "" if len(shown) == len(coords) else (
        f"A seeded, class-stratified subsample of {len(shown)} of {len(coords)} points (plots.map_max_points).")
    if note:
        log.info("map.html: %s", note)
    k = int(cfg.plots.neighbours)
    positions = np.searchsorted(shown, order[: min(int(cfg.plots.map_thumbnails), len(shown))])  # all shown

    def neighbours_of(rows: np.ndarray) -> np.ndarray:  # each thumbnailed point's, among them
        space = metrics.embedding_space(np.asarray(embeddings[shown[rows]]), distance)
        return neighbours.every_nearest(space, min(k, len(rows) - 1), distance, neighbours.exact_limit(cfg.metrics),
                                        int(cfg.seed)).indices

    paths = audit.file_paths(dataset)  # None: images held as bytes, without a file to name
    page, thumbed = interactive.page_within(
        coords[shown], labels[shown] if labels is not None else None, names,
        data.column(dataset, "index")[shown], positions,
        lambda rows: thumbnail_arrays(dataset, shown[rows], size=40, **reading), neighbours_of, k,
        plots.class_colors(len(names) if names else 1), title, note, distance, float(cfg.plots.map_max_mb),
        {name: np.asarray(values)[shown] for name, values in (columns or {}).items()}, texts,
        None if paths is None else {int(p): _shown_name(paths[shown[p]]) for p in positions})
    if len(thumbed) < len(positions):
        log.info("map.html: thumbnails for %d of %d points fit plots.map_max_mb=%s", len(thumbed), len(shown),
                 cfg.plots.map_max_mb)
    tracker.path("map.html").write_text(page, encoding="utf-8")
    log.info("map.html: %d points, %d with thumbnails, %.1f MB", len(shown), len(thumbed), len(page) / 1e6)


def _shown_name(path: str) -> str:
    """A file as map.html names it: its folder and name (``cat/0001.jpg``), enough to find it."""
    import os

    folder, name = os.path.split(path)
    return f"{os.path.basename(folder)}/{name}" if os.path.basename(folder) else name


def draw_audit(tracker: Any, cfg: DictConfig, dataset, audited, names: list[str] | None) -> None:
    """The audit's figures: ``plots/confusion.png`` (the probe's out-of-fold confusion, each row a
    share of its given class), ``plots/label_issues.png`` (the most doubtful labels, given -> suggested)
    and ``plots/duplicates.png`` (the closest pairs side by side)."""
    reading, dpi, shown = data.reading_of(cfg.dataset), int(cfg.plots.dpi), int(cfg.audit.shown)
    if audited.confusion is not None and names:
        counts = audited.confusion.astype(float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        plots.heatmap(shares, audited.confusion_names, "the probe's out-of-fold predictions: rows given, columns "
                      "predicted", "share of the given class").savefig(tracker.path("plots/confusion.png"), dpi=dpi)
    issues = audited.tables.get("label_issues")
    if issues is not None and len(issues) and shown:
        top, short = issues.head(shown), plots.NAME_CHARACTERS["caption"]
        plots.sample_grid(thumbnail_arrays(dataset, top["row"].to_numpy(), **reading),
                          [f"#{i} {plots.shortened(g, short)}\n-> {plots.shortened(s, short)} ({q:.2f})"
                           for i, g, s, q in zip(top["index"], top["given"], top["suggested"], top["score"])],
                          f"suspected label errors: {len(issues)} flagged, the {len(top)} most doubtful "
                          "(given -> suggested, label quality)"
                          ).savefig(tracker.path("plots/label_issues.png"), dpi=dpi)
    pairs = audited.tables.get("duplicates")
    if pairs is not None and len(pairs) and shown:
        top = pairs.head(max(1, shown // 2))
        rows = np.column_stack([top["row_a"], top["row_b"]]).ravel().astype(np.int64)
        captions = [text for a, b, kind, d in zip(top["index_a"], top["index_b"], top["kind"], top["distance"])
                    for text in (f"#{a}", f"#{b} {kind}\nd={d:.3g}")]
        plots.sample_grid(thumbnail_arrays(dataset, rows, **reading), captions,
                          f"{len(pairs)} duplicate pair{'' if len(pairs) == 1 else 's'}, the {len(top)} closest "
                          "(each pair side by side)"
                          ).savefig(tracker.path("plots/duplicates.png"), dpi=dpi)
