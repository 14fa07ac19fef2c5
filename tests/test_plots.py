"""Plots hold the data they were given, and stay readable with up to 100 classes."""

from __future__ import annotations

import numpy as np

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
