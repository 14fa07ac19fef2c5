"""Every figure a sweep's summary can draw keeps its axes and its words: for one reducer, two
reducers, two models, two datasets and 20 lines, the plotting axes span at least half the figure's
width and half its height, and no text (title, tick label, legend entry) reaches past its edge.

The check reads the drawn artists' extents after a real Agg draw, so it fails the way a reader
would: a legend that squeezed the axes to a sliver, or a title cut at the edge."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from latentmap import studies
from latentmap.plots import studies as study_plots

# matplotlib's own sign of a squeezed figure is an error here (the self-check below expects it).
pytestmark = pytest.mark.filterwarnings("error:constrained_layout not applied")

CASES = {  # name -> the settings that vary across the runs, besides the layer
    "one reducer": {},
    "two reducers": {"params.choice.reducer": ["pca", "umap"]},
    "two models": {"params.choice.model": ["efficientnet_lite0", "mobilenet_v2"]},
    "two datasets": {"params.choice.dataset": ["cifar10", "digits"]},
    "20 lines": {"params.seed": [str(s) for s in range(20)]},
}


def _runs(varied: dict[str, list[str]], layers: int = 5) -> pd.DataFrame:
    """A ``mlflow.search_runs``-like frame: every combination of ``varied`` at each of ``layers``
    blocks, with the reducer-specific params one option lacks (NaN), as a real sweep logs them."""
    rng = np.random.default_rng(0)
    combos = [{}]
    for key, values in varied.items():
        combos = [{**c, key: v} for c in combos for v in values]
    rows = []
    for i, combo in enumerate(combos):
        for layer in range(layers):
            row = {"run_id": f"{i:02d}{layer}" + "0" * 29, "status": "FINISHED",
                   "tags.mlflow.runName": f"run {i} {layer}",
                   "params.choice.model": "efficientnet_lite0", "params.choice.reducer": "pca",
                   "params.choice.dataset": "digits", "params.seed": "42", "params.pool": "mean",
                   "params.layer": str(layer), "tags.layer_index": str(layer), "tags.num_layers": str(layers),
                   "tags.relative_depth": str(layer / (layers - 1)), **combo}
            if row["params.choice.reducer"] == "umap":
                row["params.reducer.n_neighbors"] = "15"  # a key PCA does not have
            for metric in studies.METRICS:
                value = float(rng.uniform(0.2, 0.9))
                row[f"metrics.{metric}"] = value
                row[f"metrics.{metric}_lo"], row[f"metrics.{metric}_hi"] = value - 0.05, value + 0.05
            rows.append(row)
    return pd.DataFrame(rows)


def _covered(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of ``intervals`` (figure fractions)."""
    total, reach = 0.0, 0.0
    for start, end in sorted(intervals):
        start = max(start, reach)
        if end > start:
            total, reach = total + end - start, end
    return total


def layout_problems(figure) -> list[str]:
    """What a reader would see wrong: plotting axes (colour bars aside) that span under half the
    figure's width or height (a sliver beside a legend), or a text whose drawn extent reaches past
    the figure's edge (1 pixel of slack)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # the canvas savefig draws on
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    plotting = [ax.get_position() for ax in figure.axes if ax.get_label() != "<colorbar>"]
    spans = {"width": _covered([(b.x0, b.x1) for b in plotting]), "height": _covered([(b.y0, b.y1) for b in plotting])}
    problems = [f"the axes span {share:.0%} of the figure's {side}" for side, share in spans.items() if share < 0.5]
    # What is drawn: each axes' tight box (its title, axis labels and the tick labels in view), each
    # legend, and the figure's own texts (a suptitle).
    drawn = [(f"axes {ax.get_title() or ax.get_label()!r}", ax.get_tightbbox(renderer)) for ax in figure.axes]
    drawn += [(f"legend {[t.get_text() for t in legend.get_texts()][:2]}", legend.get_window_extent(renderer))
              for legend in [*figure.legends, *(ax.get_legend() for ax in figure.axes)] if legend is not None]
    suptitle = getattr(figure, "_suptitle", None)
    drawn += [(repr(t.get_text()), t.get_window_extent(renderer)) for t in [*figure.texts, suptitle]
              if t is not None and t.get_visible() and t.get_text().strip()]
    for what, box in drawn:
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            problems.append(f"{what} is clipped ({box.x0:.0f}..{box.x1:.0f} of {width:.0f} px wide, "
                            f"{box.y0:.0f}..{box.y1:.0f} of {height:.0f} px high)")
    return problems


@pytest.mark.parametrize("case", list(CASES))
def test_every_depth_figure_keeps_its_axes_and_its_words(case):
    summary = studies.summarize(_runs(CASES[case]))
    depth = {name: fig for name, fig in summary.figures.items() if name.startswith("depth_")}
    assert len(depth) == len(studies.METRICS)  # a figure per metric
    lines = len(summary.table["group"].unique())
    assert lines == max(1, int(np.prod([len(v) for v in CASES[case].values()])))
    for name, figure in depth.items():
        assert layout_problems(figure) == [], name
        labels = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
        assert len(labels) == (lines if lines > 1 else 0)
        assert all("nan" not in label and "n_neighbors" not in label for label in labels), labels  # swept keys only
        assert all(label.count("=") == 1 for label in labels), labels


@pytest.mark.parametrize("case", [c for c in CASES if c != "one reducer"])
def test_every_comparison_figure_of_a_sweep_at_one_depth_keeps_its_axes_and_its_words(case):
    runs = _runs(CASES[case], layers=2)
    runs = runs[runs["params.layer"] == "1"]  # one depth: the runs compared side by side, no depth plot
    summary = studies.summarize(runs)
    assert not any(name.startswith("depth_") for name in summary.figures)
    assert sorted(summary.comparisons) == sorted(f"compare_{m}" for m in studies.HEADLINE)
    for name, figure in summary.comparisons.items():
        assert layout_problems(figure) == [], name
        ax = figure.axes[0]
        assert len(ax.get_yticklabels()) == len(runs)  # a row per run


def test_a_comparison_of_runs_with_long_names_wraps_them_and_keeps_a_readable_width():
    """An experiment's report with nine varied settings named each run in ~110 characters on one line:
    the figure was 3,000 px wide, its words unreadable in the report's half-page slot. Names wrap at
    their separators; the figure stays under 9 inches wide and keeps its axes and words."""
    from latentmap import plots

    names = [" · ".join(f"setting_{k}={v}{i}" for k, v in enumerate("abcdefghi")) for i in range(6)]
    figure = plots.comparison(names, np.linspace(0.2, 0.8, 6), np.linspace(0.1, 0.7, 6), np.linspace(0.3, 0.9, 6),
                              [""] * 6, "knn_acc_hd", "knn_acc_hd")
    assert figure.get_figwidth() < 9 and layout_problems(figure) == []
    shown = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert all(max(len(line) for line in text.split("\n")) <= plots.NAME_LINE for text in shown)
    assert sorted(text.replace("\n", " ") for text in shown) == sorted(names)  # every word kept
    row = pd.Series({"varied.model": "pixels", "varied.dataset.path": np.nan, "run_id": "r" * 32})
    assert studies.run_label(row, ["model", "dataset.path"]) == "model=pixels · dataset.path="  # not "nan"


def test_the_heatmap_figures_of_a_study_keep_their_axes_and_their_words():
    rng = np.random.default_rng(1)
    matrix = rng.uniform(size=(12, 12))
    per_layer = pd.DataFrame({"layer_index": range(12), "silhouette_hd": rng.uniform(size=12),
                              "knn_acc_hd": rng.uniform(size=12)})
    assert layout_problems(study_plots.cka(matrix, "google/vit-base-patch16-224", "cls", per_layer)) == []
    measures = ["cka", "cka_debiased", "mutual_knn", "rsa", "procrustes"]
    to_last = pd.DataFrame([{"block": b, "measure": m, "value": 0.5, "lo": 0.4, "hi": 0.6, "null_edge": 0.2,
                             "p_value": 0.01, "p_adjusted": 0.02} for b in range(12) for m in measures])
    panel = study_plots.panel({m: matrix for m in measures}, to_last, "google/vit-base-patch16-224", "cls", 1000)
    assert layout_problems(panel) == []


def test_the_layout_check_catches_a_squeezed_axes_and_a_clipped_title():
    """The check itself: a legend of long labels (the ``nan`` settings of old) beside the axes
    squeezes them, and a title longer than the figure is clipped; both are reported."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), layout="constrained")
    ax = figure.add_subplot()
    for i in range(8):
        ax.plot([0, 1], [i, i], label=f"reducer.metric=nan · reducer.min_dist=nan · line {i}")
    ax.legend(loc="center left", bbox_to_anchor=(1, 0.5))
    ax.set_title("a title far longer than the six inches this figure has to offer its reader, cut at both ends")
    with warnings.catch_warnings():  # matplotlib warns about this very figure
        warnings.simplefilter("ignore", UserWarning)
        problems = layout_problems(figure)
    assert any("axes span" in p for p in problems) and any("clipped" in p for p in problems)


@pytest.mark.parametrize("n_classes", [4, 40])
def test_the_class_figures_keep_their_axes_and_words_with_long_class_names(n_classes):
    """Class folders of 80 characters squeezed the map beside its legend to a sliver, shrank the
    centroid-distance heatmap to a few pixels and ran the image grid's captions into one another:
    every class figure keeps its axes and its words, names are cut with an ellipsis where they are
    drawn (legend, ticks, captions), and a class whose name starts with "_" is in the legend
    (matplotlib leaves such labels out)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from latentmap import plots

    rng = np.random.default_rng(0)
    names = ["_background"] + ["a very long folder name of the camera trap at site " * 2 + f"{c:02d}"
                               for c in range(1, n_classes)]  # alike but at their ends
    labels = np.repeat(np.arange(n_classes), 3)
    coords = (rng.normal(size=(len(labels), 2)) + labels[:, None] * 4.0).astype(np.float32)
    images = [rng.integers(0, 256, (20 + 5 * (i % 3), 30, 3), dtype=np.uint8) for i in range(len(labels))]
    matrix = rng.uniform(size=(n_classes, n_classes))
    figures = {"scatter": plots.scatter(coords, labels, names, "map"),
               "centroids": plots.centroids(coords, labels, names, "centroids"),
               "thumbnails": plots.thumbnails(coords, images, labels, names, "thumbnails"),
               "heatmap": plots.heatmap(matrix, names, "centroid distances", "distance")}
    for what, figure in figures.items():
        assert layout_problems(figure) == [], what
    legend = [t.get_text() for t in figures["scatter"].axes[0].get_legend().get_texts()]
    assert legend[0] == "_background" and len(legend) == n_classes
    assert all(len(t) <= plots.NAME_CHARACTERS["legend"] and "\u2026" in t for t in legend[1:])
    assert len(set(legend)) == n_classes  # names alike in their first 24 characters are cut in the middle
    ticks = [t.get_text() for t in figures["heatmap"].axes[0].get_yticklabels()]
    assert all(len(t) <= plots.NAME_CHARACTERS["tick"] for t in ticks) and ticks[0] == "_background"
    captions = [f"{names[min(i, n_classes - 1)]}\nscore 0.123, 100% other" for i in range(10)]
    grid = plots.sample_grid(images[:10], captions, "outliers")
    canvas = FigureCanvasAgg(grid)
    canvas.draw()
    boxes = sorted((t.get_window_extent(canvas.get_renderer()) for t in grid.axes[0].texts), key=lambda b: b.x0)
    assert all(left.x1 <= right.x0 for left, right in zip(boxes, boxes[1:]))  # no caption runs into the next
    assert boxes[0].x0 >= 0 and boxes[-1].x1 <= grid.bbox.width
    assert all(t.get_text().endswith("\nscore 0.123, 100% other") for t in grid.axes[0].texts)  # a score stays whole
