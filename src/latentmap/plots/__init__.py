"""Figures from arrays: every function returns a matplotlib ``Figure`` (Agg, object API).

Colours: tab10 up to 10 classes, tab20 up to 20, evenly spaced hues of ``turbo`` beyond; the
legend sits outside the axes and wraps into columns of 25 entries, so 100 classes stay readable.

Text from the data (class and folder names, model names, captions) is drawn as written
(:func:`as_written`): never as mathtext, and each character in the first installed font that has it.
"""

from __future__ import annotations

import collections
import functools
import math
import textwrap
import unicodedata
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
from matplotlib.figure import Figure

LEGEND_ROWS = 25

# Fonts a figure falls back to, where installed, for the characters matplotlib's DejaVu Sans lacks
# (Chinese, Japanese, Korean, Arabic, Hebrew, Indic and Thai scripts): Linux, macOS and Windows names.
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
                  "Source Han Sans", "WenQuanYi Zen Hei", "Droid Sans Fallback", "Hiragino Sans", "PingFang SC",
                  "Apple SD Gothic Neo", "Yu Gothic", "Microsoft YaHei", "Malgun Gothic", "SimHei", "Noto Sans Arabic",
                  "Noto Sans Hebrew", "Noto Sans Devanagari", "Noto Sans Bengali", "Noto Sans Tamil", "Noto Sans Thai",
                  "Noto Sans", "Arial Unicode MS")

F = TypeVar("F", bound=Callable)


def _font_file(name: str):
    """The file matplotlib draws the family ``name`` from (a generic family as configured), or None."""
    from matplotlib import font_manager

    try:
        return font_manager.findfont(font_manager.FontProperties(family=[name]), fallback_to_default=False)
    except ValueError:  # not installed
        return None


def font_family() -> list[str]:
    """matplotlib's font family as configured (``sans-serif``, DejaVu Sans, unless a matplotlibrc
    says otherwise: a family added there is used too), then the :data:`FALLBACK_FONTS` installed
    here, one family a font file (Noto Sans CJK's file holds its JP, SC, TC and KR faces): matplotlib
    draws each character in the first of them that has it."""
    import matplotlib
    from matplotlib import font_manager

    family = list(matplotlib.rcParams["font.family"])
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    files = {str(_font_file(name)) for name in family}
    for name in FALLBACK_FONTS:
        if name in installed and name not in family and (file := str(_font_file(name))) not in files:
            family.append(name)
            files.add(file)
    return family


@functools.cache
def _characters_in(file) -> frozenset[int]:
    from matplotlib import font_manager

    try:
        return frozenset(font_manager.get_font(file).get_charmap())  # a .ttc file's face as found
    except (OSError, RuntimeError, ValueError):  # an unreadable file
        return frozenset()


def missing_characters(texts: Iterable[str]) -> list[str]:
    """The characters of ``texts`` that no font of :func:`font_family` has (a figure draws them as
    boxes), each once, in order of appearance; spaces and control characters aside."""
    files = [file for file in map(_font_file, font_family()) if file is not None]
    covered = frozenset().union(*(_characters_in(file) for file in files))
    missing: list[str] = []
    for text in texts:
        for character in str(text):
            if (ord(character) not in covered and character not in missing
                    and not unicodedata.category(character).startswith(("Z", "C"))):
                missing.append(character)
    return missing


def as_written(function: F) -> F:
    """The figure that ``function`` builds draws its text as written: with matplotlib's mathtext
    off (two "$" in a class name made it a formula: "$5 to $10" was drawn "5to10" in italics, and
    "$\\foo$" failed the figure) and in :func:`font_family`. A text keeps the font family it was
    made with, so the figure draws alike when saved later."""

    @functools.wraps(function)
    def drawn(*args, **kwargs):
        import matplotlib

        # use_mathtext off: the tick labels matplotlib adds when it draws (outside this context) do
        # not keep parse_math, so no formatter may write "$...$" into them (log axes would: none here).
        with matplotlib.rc_context({"text.parse_math": False, "axes.formatter.use_mathtext": False,
                                    "font.family": font_family()}):
            return function(*args, **kwargs)

    return drawn  # type: ignore[return-value]


def class_colors(n_classes: int) -> np.ndarray:
    """(C, 4) RGBA colours, distinct for up to 20 classes, evenly spaced beyond."""
    from matplotlib import colormaps

    if n_classes <= 10:
        return colormaps["tab10"](np.arange(n_classes))
    if n_classes <= 20:
        return colormaps["tab20"](np.arange(n_classes))
    return colormaps["turbo"](np.linspace(0.02, 0.98, n_classes))


# The longest class name a figure writes whole, in characters: a legend entry (its column is 1.6
# inches), a tick label of a heatmap, a name in an image grid's caption (beside an index or a score:
# "name #12345"). Longer names (80 characters of a folder name) squeezed the map to a sliver, shrank
# a heatmap to a few pixels and ran the grid's captions into one another; they are cut with an
# ellipsis (the tables and map.html's tooltip keep them whole). A caption's line is cut at
# CAPTION_LINE characters, what a grid's 1.3-inch column holds at 7.5 pt ("score 0.123, 100% other").
NAME_CHARACTERS = {"legend": 24, "tick": 24, "caption": 14}
CAPTION_LINE = 24


def shortened(text: str, limit: int) -> str:
    """Each line of ``text`` at most ``limit`` characters: a longer one cut, ending in an ellipsis."""
    return "\n".join(line if len(line) <= limit else line[: limit - 1].rstrip() + "\u2026"
                     for line in str(text).split("\n"))


def shortened_apart(names: list[str], limit: int) -> list[str]:
    """:func:`shortened` of each name, where that keeps them apart: names whose starts are alike
    (``camera_trap_2021_site_A`` and ``..._site_B``) are cut in the middle instead, keeping their
    ends."""
    cut = [shortened(name, limit) for name in names]
    counts = collections.Counter(cut)
    head = (limit - 1) // 2
    return [short if counts[short] == 1 or len(name) <= limit
            else name[:head].rstrip() + "\u2026" + name[len(name) - (limit - 1 - head):]
            for name, short in zip(names, cut)]


def _legend(fig: Figure, ax, entries: list[tuple[object, str]], markerscale: float = 1.5) -> None:
    """The class legend beside the axes: ``entries`` (artist, class name), each name as written
    (matplotlib leaves out a label that starts with "_", a class "_background" too), cut to
    :data:`NAME_CHARACTERS`."""
    n_classes = len(entries)
    columns = max(1, math.ceil(n_classes / LEGEND_ROWS))
    ax.legend(
        [artist for artist, _ in entries], shortened_apart([name for _, name in entries], NAME_CHARACTERS["legend"]),
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0), ncols=columns, fontsize=7 if n_classes > 20 else 9,
        markerscale=markerscale, frameon=False, title="class",
    )


def _figure(n_classes: int, height: float = 7.0) -> tuple[Figure, object]:
    columns = max(1, math.ceil(n_classes / LEGEND_ROWS)) if n_classes else 0
    fig = Figure(figsize=(height + 1.6 * columns + 0.4, height), layout="constrained")
    return fig, fig.add_subplot()


def _point_size(n_points: int) -> float:
    return float(np.clip(4000 / max(n_points, 1), 1.5, 40))


@as_written
def scatter(coords: np.ndarray, labels: np.ndarray | None, class_names: list[str] | None, title: str) -> Figure:
    """The 2-D map coloured by class (one colour when unlabelled)."""
    n_classes = len(class_names) if class_names else 0
    fig, ax = _figure(n_classes)
    size = _point_size(len(coords))
    if labels is None:
        ax.scatter(coords[:, 0], coords[:, 1], s=size, alpha=0.7, linewidths=0)
    else:
        colors = class_colors(n_classes)
        entries = []
        for c, name in enumerate(class_names):
            mask = labels == c
            entries.append((ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=colors[c], alpha=0.75,
                                       linewidths=0), name))
        _legend(fig, ax, entries)
    ax.set_aspect("equal", adjustable="datalim")  # one unit as long on both axes: the map's true shape
    ax.set_title(title)
    ax.set_xlabel("dim 1")
    ax.set_ylabel("dim 2")
    return fig


@as_written
def centroids(coords: np.ndarray, labels: np.ndarray, class_names: list[str], title: str) -> Figure:
    """Points (faint) with each class centroid marked and named."""
    n_classes = len(class_names)
    fig, ax = _figure(n_classes)
    colors = class_colors(n_classes)
    size = _point_size(len(coords))
    entries = []
    for c, name in enumerate(class_names):
        mask = labels == c
        if not mask.any():
            continue
        ax.scatter(coords[mask, 0], coords[mask, 1], s=size, color=colors[c], alpha=0.2, linewidths=0)
        centre = coords[mask].mean(axis=0)
        entries.append((ax.scatter(*centre, s=220, color=colors[c], edgecolors="black", linewidths=1.2, marker="X",
                                   zorder=3), name))
        ax.annotate(shortened(name, NAME_CHARACTERS["caption"]), centre, xytext=(6, 6), textcoords="offset points",
                    fontsize=8, weight="bold")
    _legend(fig, ax, entries, markerscale=0.5)
    ax.set_aspect("equal", adjustable="datalim")  # one unit as long on both axes: the map's true shape
    ax.set_title(title)
    ax.set_xlabel("dim 1")
    ax.set_ylabel("dim 2")
    return fig


@as_written
def thumbnails(
    coords: np.ndarray,
    images: list[np.ndarray],
    labels: np.ndarray | None,
    class_names: list[str] | None,
    title: str,
    zoom: float | None = None,
) -> Figure:
    """Image thumbnails (H, W, 3 uint8 each) at their 2-D positions, framed in their class colour."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    n_classes = len(class_names) if class_names else 0
    fig, ax = _figure(n_classes, height=10.0)
    colors = class_colors(n_classes) if n_classes else None
    if zoom is None:
        largest = max(max(image.shape[:2]) for image in images) if images else 32
        zoom = float(np.clip(28.0 / largest, 0.1, 4.0))
    for point, image, c in zip(coords, images, labels if labels is not None else [None] * len(coords)):
        frame = colors[c] if c is not None else "grey"
        box = AnnotationBbox(OffsetImage(image, zoom=zoom, cmap="gray"), point, frameon=True, pad=0.1,
                             bboxprops={"edgecolor": frame, "linewidth": 1.5})
        ax.add_artist(box)
    if len(coords):
        ax.update_datalim(coords)
        ax.autoscale_view()
        ax.margins(0.05)
    if n_classes:
        _legend(fig, ax, [(ax.scatter([], [], color=colors[c], marker="s"), name)
                          for c, name in enumerate(class_names)])
    ax.set_aspect("equal", adjustable="datalim")  # one unit as long on both axes: the map's true shape
    ax.set_title(title)
    ax.set_xlabel("dim 1")
    ax.set_ylabel("dim 2")
    return fig


CELL_PIXELS = 96  # each image of a grid, resized to fit this square (nearest up, Lanczos down)
_RED = "#d62728"


def _cell(image: np.ndarray) -> np.ndarray:
    """(CELL_PIXELS, CELL_PIXELS, 3) uint8: an image fitted into a white square, aspect kept; a
    grey-level image scaled from its own minimum to maximum, as ``imshow(cmap="gray")`` shows it."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:  # grey levels of any type, min to max
        array = array.astype(np.float64)
        low, high = np.nanmin(array), np.nanmax(array)
        array = (array - low) / (high - low) if high > low else np.zeros_like(array)
    if array.dtype != np.uint8:  # [0, 1] levels
        array = np.clip(np.nan_to_num(array) * 255 + 0.5, 0, 255).astype(np.uint8)
    picture = Image.fromarray(array).convert("RGB")
    scale = CELL_PIXELS / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    square = np.full((CELL_PIXELS, CELL_PIXELS, 3), 255, np.uint8)
    top, left = (CELL_PIXELS - size[1]) // 2, (CELL_PIXELS - size[0]) // 2
    square[top : top + size[1], left : left + size[0]] = np.asarray(picture)
    return square


@as_written
def image_grid(cells: list[list[tuple[np.ndarray, str, str, bool] | None]], title: str,
               caption_lines: int = 2) -> Figure:
    """Rows of images with a caption above each: ``cells[r][c]`` is (image, caption, caption colour,
    framed in red) or None for an empty place. The images are pasted into one picture drawn on one
    axes, so a grid of a hundred images costs one image and its captions to draw (a grid of one axes
    an image took 10 times longer, constrained layout most of it)."""
    rows = max(1, len(cells))
    columns = max(1, max((len(row) for row in cells), default=1))
    gap, band = 8, 13 * caption_lines + 4  # pixels between images; caption band above each image
    step_x, step_y = CELL_PIXELS + gap, CELL_PIXELS + band + gap
    mosaic = np.full((rows * step_y, columns * step_x, 3), 255, np.uint8)
    places = []
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is None:
                continue
            image, caption, colour, framed = cell
            top, left = r * step_y + band, c * step_x + gap // 2
            mosaic[top : top + CELL_PIXELS, left : left + CELL_PIXELS] = _cell(image)
            if framed:  # a red frame, 3 pixels wide, around the image
                red = np.array([214, 39, 40], np.uint8)
                for edge in (np.s_[top : top + 3, left : left + CELL_PIXELS],
                             np.s_[top + CELL_PIXELS - 3 : top + CELL_PIXELS, left : left + CELL_PIXELS],
                             np.s_[top : top + CELL_PIXELS, left : left + 3],
                             np.s_[top : top + CELL_PIXELS, left + CELL_PIXELS - 3 : left + CELL_PIXELS]):
                    mosaic[edge] = red
            places.append((left + CELL_PIXELS / 2, top - 2, caption, colour))
    inch = 1.3 / step_x  # inches a mosaic pixel takes: 1.3 inches a column, as the grids had
    figure_width = mosaic.shape[1] * inch + 0.2
    # The title wrapped to the figure's width (about 12 characters an inch at 11 pt): a grid of one
    # or two images is narrower than its title, which was cut off at both edges.
    title = "\n".join(textwrap.fill(line, width=max(16, int(figure_width * 12))) for line in title.split("\n"))
    title_inches = 0.25 + 0.2 * (title.count("\n") + 1)
    fig = Figure(figsize=(figure_width, mosaic.shape[0] * inch + title_inches + 0.1))
    width, height = fig.get_figwidth(), fig.get_figheight()
    ax = fig.add_axes((0.1 / width, 0.05 / height, mosaic.shape[1] * inch / width, mosaic.shape[0] * inch / height))
    ax.imshow(mosaic, interpolation="antialiased")
    ax.set_axis_off()
    for x, y, caption, colour in places:
        ax.text(x, y, shortened(caption, CAPTION_LINE), ha="center", va="bottom", fontsize=7.5,
                color=colour, linespacing=1.1, clip_on=False, wrap=False)
    fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top", fontsize=11)
    return fig


@as_written
def sample_grid(images: list[np.ndarray], captions: list[str], title: str) -> Figure:
    """A grid of images (10 a row) with their labels as captions."""
    columns = min(10, max(1, len(images)))
    cells = [(image, caption, "black", False) for image, caption in zip(images, captions)]
    lines = max((caption.count("\n") + 1 for caption in captions), default=1)
    return image_grid([cells[i : i + columns] for i in range(0, len(cells), columns)] or [[]], title, lines)


@as_written
def heatmap(matrix: np.ndarray, class_names: list[str], title: str, colorbar_label: str) -> Figure:
    """A (C, C) matrix with class names on both axes; values written in cells up to 20 classes."""
    n_classes = len(class_names)
    side = float(np.clip(0.35 * n_classes + 3, 6, 24))
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis")
    fig.colorbar(image, ax=ax, label=colorbar_label, shrink=0.8)
    fontsize = 10 if n_classes <= 12 else 8 if n_classes <= 30 else 5
    class_names = shortened_apart(class_names, NAME_CHARACTERS["tick"])
    longest = max((len(str(name)) for name in class_names), default=0)
    rotation = 0 if longest <= 3 else 45  # short names stay level; long ones slant, never stand on end
    ax.set_xticks(range(n_classes), class_names, rotation=rotation, ha="right" if rotation else "center",
                  rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticks(range(n_classes), class_names, fontsize=fontsize)
    if n_classes <= 20:
        threshold = np.nanmean(matrix)
        cell_font = 10 if n_classes <= 10 else 8
        for i in range(n_classes):
            for j in range(n_classes):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=cell_font, rotation=0,
                        color="white" if matrix[i, j] < threshold else "black")
    ax.set_title(title)
    return fig


@as_written
def neighbour_rows(
    queries: list[np.ndarray],
    query_captions: list[str],
    neighbours: list[list[np.ndarray]],
    neighbour_captions: list[list[str]],
    wrong: list[list[bool]],
    title: str,
) -> Figure:
    """One row per query: the query image, then its neighbours; wrong-class neighbours framed red,
    their captions red and marked ✗."""
    cells = []
    for query, caption, row, texts, bad in zip(queries, query_captions, neighbours, neighbour_captions, wrong):
        cells.append([(query, f"query\n{caption}", "black", False)] + [
            (image, ("✗ " if b else "") + text, _RED if b else "black", bool(b))
            for image, text, b in zip(row, texts, bad)])
    lines = max([2] + [t.count("\n") + 1 for texts in neighbour_captions for t in texts])
    return image_grid(cells or [[]], title, lines)


@as_written
def forest(names: list[str], differences: np.ndarray, lows: np.ndarray, highs: np.ndarray, title: str,
           xlabel: str, adjusted: np.ndarray | None = None, own_scale: tuple[str, ...] = (),
           untested: str = "not tested") -> Figure:
    """A forest plot: each row a metric, its difference as a point and its interval as a line;
    the vertical line at 0 is "no difference". With ``adjusted`` (p-values adjusted over the
    family; NaN: not tested), a row is dark where the adjusted p is below 0.05, grey where not, and
    light where no test was made (``untested`` says why), with a legend saying so; without it, dark where the interval
    excludes 0. Metrics in ``own_scale`` (TwoNN's dimension: differences of several units) get an
    axis of their own below, so that they do not flatten the others' intervals to dots."""
    from matplotlib.lines import Line2D

    names = list(names)
    differences, lows, highs = (np.asarray(v, dtype=np.float64) for v in (differences, lows, highs))
    if adjusted is None:
        kind = np.where((lows > 0) | (highs < 0), "significant", "not")
    else:
        adjusted = np.asarray(adjusted, dtype=np.float64)
        kind = np.where(np.isnan(adjusted), "untested", np.where(adjusted < 0.05, "significant", "not"))
    palette = {"significant": "#1f3a93", "not": "#8a8a8a", "untested": "#cfcfcf"}
    shared = [i for i, name in enumerate(names) if name not in own_scale]
    groups = [g for g in (shared, [i for i in range(len(names)) if i not in shared]) if g]
    fig = Figure(figsize=(8, 1.6 + 0.45 * len(names) + 0.6 * (len(groups) - 1)), layout="constrained")
    axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=[len(g) + 0.8 for g in groups])[:, 0]
    for ax, group in zip(axes, groups):
        rows = np.arange(len(group))[::-1]
        colours = [palette[kind[i]] for i in group]
        ax.hlines(rows, lows[group], highs[group], colors=colours, linewidth=2.5)
        ax.scatter(differences[group], rows, c=colours, zorder=3, s=40)
        ax.axvline(0, color="#b03030", linewidth=1, linestyle="--")
        ax.set_yticks(rows, [names[i] for i in group])
        ax.set_ylim(-0.6, len(group) - 0.4)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel(xlabel)
    fig.suptitle(title)
    if adjusted is not None:
        said = {"significant": "adjusted p < 0.05", "not": "adjusted p >= 0.05", "untested": untested}
        present = [k for k in ("significant", "not", "untested") if (kind == k).any()]
        fig.legend([Line2D([], [], color=palette[k], marker="o", linewidth=2.5) for k in present],
                   [said[k] for k in present], loc="outside lower center", ncols=len(present), fontsize=8,
                   frameon=False)
    return fig


def legend_height(labels: list[str], width: float, fontsize: float = 8) -> tuple[float, int]:
    """(inches, columns) a legend of ``labels`` needs below axes ``width`` inches wide: as many
    columns as the longest label allows, one text line (plus spacing) per row."""
    if not labels:
        return 0.0, 1
    char = 0.62 * fontsize / 72  # a wide character's width, in inches
    column = max(len(text) for text in labels) * char + 0.6  # the marker, its padding and the column gap
    columns = max(1, min(len(labels), int(0.95 * width // column)))
    rows = math.ceil(len(labels) / columns)
    return 0.25 + rows * 1.45 * fontsize / 72, columns


def legend_below(fig: Figure, ax, fontsize: float = 8) -> None:
    """The axes' legend in the space below them (the caller made the figure taller by
    :func:`legend_height`), so a legend of any length never shrinks the axes or covers a line."""
    handles, labels = ax.get_legend_handles_labels()
    if not labels:
        return
    _, columns = legend_height(labels, fig.get_figwidth(), fontsize)
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=fontsize, frameon=False)


NAME_LINE = 48  # characters a line of a run's name in a comparison figure (wrapped at its spaces)


@as_written
def comparison(names: list[str], values: np.ndarray, lows: np.ndarray, highs: np.ndarray, groups: list[str],
               title: str, xlabel: str) -> Figure:
    """Runs side by side on one metric: a dot per run with its interval as a bar, one row per run,
    rows of one ``groups`` value together and coloured alike (their legend below)."""
    import textwrap

    order = list(dict.fromkeys(groups))
    colours = class_colors(max(len(order), 1))
    legend = [g for g in order if g]
    # A long run name (many settings varied: an experiment's report) wraps onto lines of at most
    # NAME_LINE characters at its " · " separators, so the figure keeps a width a report's
    # half-page slot shows readably (one line of 110 characters made it 3,000 px wide).
    names = [textwrap.fill(name, NAME_LINE, break_long_words=False) for name in names]
    lines = max((name.count("\n") + 1 for name in names), default=1)
    # Wide enough that the run names (the y tick labels, 9 pt) leave the axes over half the width.
    longest = max((len(line) for name in names for line in name.split("\n")), default=0)
    width = max(5.6, 1.0 + 2.2 * longest * 0.075)
    extra, _ = legend_height(legend, width)
    fig = Figure(figsize=(width, 1.3 + (0.3 + 0.16 * (lines - 1)) * len(names) + extra), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.15)  # room for an x tick label centred on the axes' right edge
    ax = fig.add_subplot()
    y = np.arange(len(names))[::-1]
    for colour, group in zip(colours, order):
        rows = [i for i, g in enumerate(groups) if g == group]
        has = [i for i in rows if np.isfinite(lows[i]) and np.isfinite(highs[i])]
        ax.errorbar(values[rows], y[rows], fmt="o", color=colour, markersize=6, label=group or None)
        if has:
            ax.hlines(y[has], lows[has], highs[has], color=colour, linewidth=2.2)
    ax.set_yticks(y, names, fontsize=9)
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    if legend:
        legend_below(fig, ax)
    return fig


def png_data_uri(source, dpi: int = 110) -> str:
    """A ``data:image/png;base64,...`` URI of an (h, w, 3) uint8 image, a matplotlib figure (at
    ``dpi``) or a PNG file: how every self-contained page (map.html, report.html) embeds pictures."""
    import base64
    import io
    from pathlib import Path

    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()
    else:
        buffer = io.BytesIO()
        if isinstance(source, np.ndarray):
            from PIL import Image

            Image.fromarray(source).save(buffer, format="PNG", optimize=True)
        else:
            source.savefig(buffer, format="png", dpi=dpi)
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
