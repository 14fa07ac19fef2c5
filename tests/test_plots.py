"""Plots hold the data they were given, and stay readable with up to 100 classes."""

from __future__ import annotations

import numpy as np
import pytest

from latentmap import metrics, plots


def _blobs(n_classes: int, per_class: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    coords = rng.normal(size=(len(labels), 2)) + labels[:, None] * 3.0
    return coords.astype(np.float32), labels, [f"class {c}" for c in range(n_classes)]


def test_scatter_draws_every_point_in_its_class_colour():
    coords, labels, names = _blobs(3)
    fig = plots.scatter(coords, labels, names, "t")
    ax = fig.axes[0]
    for c, collection in enumerate(ax.collections):
        np.testing.assert_allclose(collection.get_offsets(), coords[labels == c])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == names


def test_legend_of_100_classes_wraps_into_columns_of_distinct_colours():
    coords, labels, names = _blobs(100, per_class=2)
    fig = plots.scatter(coords, labels, names, "t")
    legend = fig.axes[0].get_legend()
    assert len(legend.get_texts()) == 100
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # lay the legend out, then read where its entries landed
    lefts = [round(text.get_window_extent(canvas.get_renderer()).x0) for text in legend.get_texts()]
    assert len(set(lefts)) == 4  # four columns: 25 rows a column
    assert [lefts.count(x) for x in sorted(set(lefts))] == [25, 25, 25, 25]
    colours = plots.class_colors(100)
    assert len({tuple(np.round(c, 4)) for c in colours}) == 100
    assert fig.get_size_inches()[0] > 12  # the figure widens for the legend columns


def test_centroids_are_class_means():
    coords, labels, names = _blobs(4)
    fig = plots.centroids(coords, labels, names, "t")
    markers = [c for c in fig.axes[0].collections if len(c.get_offsets()) == 1]
    centres = np.array([m.get_offsets()[0] for m in markers])
    np.testing.assert_allclose(centres, [coords[labels == c].mean(0) for c in range(4)], rtol=1e-5)


def test_centroid_distance_matrix_matches_scipy():
    from scipy.spatial.distance import cdist

    coords, labels, _ = _blobs(4)
    means = np.stack([coords[labels == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(metrics.centroid_distances(coords, labels, 4, "euclidean"), cdist(means, means),
                               atol=1e-6)
    np.testing.assert_allclose(metrics.centroid_distances(coords, labels, 4, "cosine"),
                               cdist(means, means, "cosine"), atol=1e-6)


def test_thumbnails_places_one_image_per_point():
    from matplotlib.offsetbox import AnnotationBbox

    coords, labels, names = _blobs(2, per_class=3)
    images = [np.full((8, 8, 3), 40 * i, np.uint8) for i in range(len(coords))]
    fig = plots.thumbnails(coords, images, labels, names, "t")
    boxes = [a for a in fig.axes[0].artists if isinstance(a, AnnotationBbox)]
    assert len(boxes) == len(coords)
    np.testing.assert_allclose([b.xy for b in boxes], coords)


def test_small_plot_fixes_labels_level_cell_numbers_and_whole_block_ticks():
    """thumbnails and centroids have axis labels; the heatmap's cell numbers are readable (>= 8 pt)
    and level, short class names stand level too; the CKA panel's block axes tick whole blocks."""
    import pandas as pd

    from latentmap.plots import studies as study_plots

    rng = np.random.default_rng(0)
    coords, labels, names = rng.normal(size=(40, 2)), np.repeat(np.arange(4), 10), ["a", "b", "c", "d"]
    for figure in (plots.centroids(coords, labels, names, "t"),
                   plots.thumbnails(coords, [np.zeros((8, 8, 3), np.uint8)] * 40, labels, names, "t")):
        ax = figure.axes[0]
        assert (ax.get_xlabel(), ax.get_ylabel()) == ("dim 1", "dim 2")
    heat = plots.heatmap(rng.random((4, 4)), names, "t", "distance")
    ax = heat.axes[0]
    assert len(ax.texts) == 16 and all(t.get_fontsize() >= 8 and t.get_rotation() == 0 for t in ax.texts)
    assert all(label.get_rotation() == 0 for label in ax.get_xticklabels())
    per_layer = pd.DataFrame({"layer_index": range(3), "silhouette_hd": [0.1, 0.2, 0.3], "knn_acc_hd": [0.5, 0.6, 0.7]})
    cka = study_plots.cka(np.eye(3), "m", "mean", per_layer)
    cka.canvas.draw()
    for axis in (cka.axes[0].xaxis, cka.axes[1].xaxis, cka.axes[0].yaxis):
        ticks = [t for t in axis.get_majorticklocs()
                 if axis.get_view_interval().min() <= t <= axis.get_view_interval().max()]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_image_grids_paste_each_image_once_with_its_caption_and_frame_the_wrong_ones_red():
    """neighbour_rows draws its images into one picture: each image (already of the cell's size)
    appears unchanged at its place, a grey-level image scaled min to max as imshow shows it, a
    wrong-class neighbour framed red with a red ✗ caption, and every caption written once."""
    from latentmap.plots import CELL_PIXELS, neighbour_rows

    rng = np.random.default_rng(0)
    side = CELL_PIXELS
    query = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    right = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    wrong = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    grey = rng.random((side, side))
    fig = neighbour_rows([query], ["cat #1"], [[right, wrong, grey]], [["cat #2", "dog #3", "cat #4"]],
                         [[False, True, False]], "3 nearest")
    (ax,) = fig.axes
    (picture,) = ax.get_images()
    mosaic = np.asarray(picture.get_array())
    tops = []
    for image in (query, right):  # each image is somewhere, whole
        hits = [(r, c) for r, c in np.argwhere(np.all(mosaic == image[0, 0], axis=-1))
                if r + side <= mosaic.shape[0] and c + side <= mosaic.shape[1]
                and np.array_equal(mosaic[r:r + side, c:c + side], image)]
        assert len(hits) == 1
        tops.append(hits[0])
    assert tops[0][0] == tops[1][0] and tops[1][1] > tops[0][1]  # one row, query first
    top, left = tops[1][0], tops[1][1] + (tops[1][1] - tops[0][1])  # the wrong one, next place
    assert np.all(mosaic[top, left:left + side] == [214, 39, 40])  # its frame's top edge is red
    assert np.array_equal(mosaic[top + 3:top + side - 3, left + 3:left + side - 3], wrong[3:-3, 3:-3])
    left_grey = left + (tops[1][1] - tops[0][1])
    expected = ((grey - grey.min()) / (grey.max() - grey.min()) * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(mosaic[top:top + side, left_grey:left_grey + side, 0], expected)
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert texts == {"query\ncat #1": "black", "cat #2": "black", "✗ dog #3": "#d62728", "cat #4": "black"}
    assert fig._suptitle.get_text() == "3 nearest"


def test_a_grid_s_title_fits_a_grid_of_two_images():
    """A grid of one duplicate pair is narrower than its title, which was cut off at both edges: the
    title wraps to the figure's width, and every line lies inside the figure."""
    images = [np.full((8, 8, 3), 120, np.uint8)] * 2
    title = "1 duplicate pair, the 1 closest (each pair side by side)"
    fig = plots.sample_grid(images, ["#869", "#1134 near\nd=0.0126"], title)
    fig.canvas.draw()
    box, shown = fig._suptitle.get_window_extent(), fig.bbox
    assert shown.x0 <= box.x0 and box.x1 <= shown.x1 and box.y1 <= shown.y1, (box, shown)
    assert fig._suptitle.get_text().replace("\n", " ") == title


def test_neighbours_png_says_which_classes_its_queries_leave_out():
    """Six query rows of a ten-class set show six classes: the title says so and names the setting;
    with a row for every class (or no labels) it says nothing more. A line break in a grid's title
    is kept where it was put."""
    from latentmap import data
    from latentmap.figures import _queries_note

    labels = np.repeat(np.arange(10), 5)
    queries = data.balanced_order(labels, len(labels), 0)[:6]
    note = _queries_note(labels, queries)
    assert note == "\nquery images from 6 of the 10 classes; plots.neighbour_queries=6 sets how many rows"
    assert _queries_note(labels % 4, queries) == ""  # four classes, six rows: every class is there
    assert _queries_note(None, queries) == ""
    images = [np.full((8, 8, 3), 120, np.uint8)] * 4
    fig = plots.sample_grid(images, ["a", "b", "c", "d"], "3 nearest" + note)
    assert fig._suptitle.get_text().split("\n")[0] == "3 nearest"
    assert fig._suptitle.get_text().replace("\n", " ").endswith("sets how many rows")


def test_the_forest_plot_reads_significance_on_the_adjusted_p_and_scales_twonn_apart():
    """compare.png: a row is dark only where Holm's adjusted p is below 0.05 (it followed the raw
    interval), light where no test was made, with a legend saying which is which; TwoNN's
    differences of several units get an axis of their own (they flattened the others to dots)."""
    from matplotlib.colors import to_hex

    names = ["knn_acc_hd", "silhouette_2d", "probe_acc", "twonn_id"]
    fig = plots.forest(names, np.array([0.05, 0.03, 0.0, 7.0]), np.array([0.02, 0.001, 0.0, 5.0]),
                       np.array([0.08, 0.06, 0.0, 9.0]), "A - B", "difference", adjusted=np.array([0.001, 0.12,
                                                                                                   np.nan, 0.04]),
                       own_scale=("twonn_id",), untested="not tested (the same in both runs)")
    top, bottom = fig.axes[:2]
    assert [t.get_text() for t in top.get_yticklabels()] == ["knn_acc_hd", "silhouette_2d", "probe_acc"]
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["twonn_id"]
    assert top.get_xlim()[1] < 1 and bottom.get_xlim()[1] > 8  # each metric on a scale it can be read at
    colours = [to_hex(c) for c in top.collections[1].get_facecolors()]
    # silhouette_2d's interval excludes 0, but its adjusted p is 0.12: grey, not dark
    assert colours == ["#1f3a93", "#8a8a8a", "#cfcfcf"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "adjusted p < 0.05", "adjusted p >= 0.05", "not tested (the same in both runs)"]


def test_the_static_maps_keep_one_unit_as_long_on_both_axes():
    """scatter.png, thumbnails.png and centroids.png draw the map's true shape: equal units on both
    axes (a long, flat map was stretched to the figure's box)."""
    rng = np.random.default_rng(0)
    coords = np.column_stack([rng.normal(0, 10, 60), rng.normal(0, 1, 60)])  # ten times wider than tall
    labels = np.repeat(np.arange(3), 20)
    names = ["a", "b", "c"]
    for figure in (plots.scatter(coords, labels, names, "t"), plots.centroids(coords, labels, names, "t"),
                   plots.thumbnails(coords, [np.zeros((8, 8, 3), np.uint8)] * 60, labels, names, "t")):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        ax = figure.axes[0]
        FigureCanvasAgg(figure).draw()  # the aspect is applied when drawn
        box = ax.get_window_extent()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        assert box.width / (x1 - x0) == pytest.approx(box.height / (y1 - y0), rel=0.01)


def _drawn(fig) -> list:
    """Every text of ``fig`` after drawing it to a PNG in memory (a bad formula raised here)."""
    import io

    from matplotlib.text import Text

    fig.savefig(io.BytesIO(), format="png", dpi=40)
    return [t for t in fig.findobj(Text) if t.get_text()]


def test_names_with_dollar_signs_are_drawn_as_written_not_as_formulas():
    """Class names, captions and titles come from the data: two "$" made matplotlib read a formula
    ("$5 to $10" drawn "5to10" in italics, "$\\foo$" an error that failed the figure)."""
    names = ["$5 to $10", "$\\foo$", "x_1^2 $y$"]
    coords, labels, _ = _blobs(3)
    title = "a $\\bar$ title"
    figures = [plots.scatter(coords, labels, names, title), plots.centroids(coords, labels, names, title),
               plots.heatmap(np.eye(3), names, title, "d"),
               plots.sample_grid([np.zeros((8, 8, 3), np.uint8)] * 3, names, title)]
    for fig in figures:
        texts = _drawn(fig)
        dollars = [t for t in texts if "$" in t.get_text()]
        assert {t.get_text() for t in dollars} >= {title, *names}
        assert not any(t.get_parse_math() for t in dollars)


def _a_character_only(font: str) -> str:
    """A printable character that ``font`` has and DejaVu Sans (matplotlib's sans-serif) lacks, read
    from both fonts' character maps."""
    import unicodedata

    from matplotlib import font_manager, ft2font

    def charmap(name):
        return set(ft2font.FT2Font(font_manager.findfont(name, fallback_to_default=False)).get_charmap())

    return next(chr(c) for c in sorted(charmap(font) - charmap("DejaVu Sans"))
                if unicodedata.category(chr(c))[0] in "LS")


def test_a_character_missing_from_dejavu_sans_is_drawn_in_an_installed_font_that_has_it(monkeypatch):
    """Where a fallback font is installed (STIXGeneral, which matplotlib ships, stands in for Noto
    Sans CJK here), a character DejaVu Sans lacks is drawn in it: no "Glyph missing" warning, and
    missing_characters finds nothing to report; without it, both say the character is missing."""
    import warnings

    import matplotlib

    rare = _a_character_only("STIXGeneral")
    coords, labels, _ = _blobs(2)
    names = [f"class {rare}", "plain"]
    for fallbacks, missing in ((("Not An Installed Font", "STIXGeneral"), []), ((), [rare])):
        monkeypatch.setattr(plots, "FALLBACK_FONTS", fallbacks)
        configured = list(matplotlib.rcParams["font.family"])
        assert plots.font_family() == [*configured, *(["STIXGeneral"] if fallbacks else [])]
        assert plots.missing_characters(names) == missing
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _drawn(plots.scatter(coords, labels, names, "t"))
        glyph = [str(w.message) for w in caught if "missing from" in str(w.message)]  # "... font(s) DejaVu Sans"
        assert bool(glyph) == bool(missing), glyph
    assert plots.missing_characters(["a b\tc\u200b", "Ωmega"]) == []  # spaces and format characters aside
