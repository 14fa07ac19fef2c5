"""Looking closer: a run's outlier scores, and map.html driven in a real browser (the neighbour
search itself: test_neighbours.py; the page's assembly: test_interactive.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentmap import plots
from latentmap.runner import run

from helpers import ROOT, compose, cosine_knn, mlflow_runs, write_class_images

SCREENSHOT = ROOT / "outputs" / "test-artifacts" / "map.png"


@pytest.fixture(scope="module")
def looked_run(tmp_path_factory):
    """A run over 4 structured classes with 3 noise images planted among them."""
    root = tmp_path_factory.mktemp("planted")
    folder = root / "images"
    write_class_images(folder, n_per_class=10)
    rng = np.random.default_rng(1)
    planted = []
    for i, name in enumerate(("blue", "green", "red")):
        path = folder / name / f"zz_noise{i}.png"  # sorts last in its class
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        planted.append(path)
    out = root / "out"
    cfg = compose(["model=pixels", "dataset=imagefolder", f"dataset.path={folder}", "reducer=pca", "metrics.k=5",
                   "plots.neighbours=4", "plots.neighbour_queries=3", "plots.outliers=6", "metrics.probe=false"], out)
    run(cfg)
    client, runs = mlflow_runs(out)
    artifacts = Path(client.download_artifacts(runs[0].info.run_id, ""))
    files = sorted(p for d in sorted(folder.iterdir()) for p in d.iterdir())  # imagefolder order
    return artifacts, files, planted


def test_planted_noise_images_rank_as_the_top_outliers(looked_run):
    artifacts, files, planted = looked_run
    scores = np.load(artifacts / "arrays" / "outlier_score.npy", allow_pickle=False)
    indices = np.load(artifacts / "arrays" / "indices.npy", allow_pickle=False)
    assert scores.shape == (len(files),)
    top3 = {files[indices[row]] for row in np.argsort(-scores)[:3]}
    assert top3 == set(planted)
    disagreement = np.load(artifacts / "arrays" / "neighbour_disagreement.npy", allow_pickle=False)
    planted_rows = [row for row in range(len(files)) if files[indices[row]] in planted]
    assert disagreement[planted_rows].mean() > disagreement.mean()
    for name in ("neighbours.png", "outliers.png"):
        assert Image.open(artifacts / "plots" / name).size[0] > 300


def _chromium() -> str:
    found = os.environ.get("LATENTMAP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "no chromium on PATH (Debian: apt-get install chromium); the map.html browser test needs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _decoded(data_uri: str) -> np.ndarray:
    assert data_uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.split(",", 1)[1]))).convert("RGB"))


def test_map_html_in_a_real_browser(looked_run):
    """Hover a point: its image, label, index and coordinates. Click it: its nearest neighbours in
    the embedding space. Click a legend entry: that class is hidden. Screenshot kept."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    executable = _chromium()
    artifacts, files, _ = looked_run
    coords = np.load(artifacts / "arrays" / "coords.npy")
    labels = np.load(artifacts / "arrays" / "labels.npy")
    indices = np.load(artifacts / "arrays" / "indices.npy")
    embeddings = np.load(artifacts / "arrays" / "embeddings.npy")
    classes = json.loads((artifacts / "arrays" / "classes.json").read_text())
    page_file = artifacts / "map.html"
    assert "<script src=" not in page_file.read_text()  # self-contained: no script loaded from elsewhere

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 860})
        page.route("http*://**", lambda route: route.abort())  # any network request would fail
        page.goto(page_file.as_uri())
        page.wait_for_selector(".scatterlayer .trace path.point")
        # Every drawn point: its trace, its row (Plotly's customdata) and its centre on screen.
        points = page.evaluate("""() => {
            const gd = document.getElementById('lm-map');
            const out = [];
            document.querySelectorAll('.scatterlayer .trace').forEach((trace, t) => {
                trace.querySelectorAll('path.point').forEach((p, i) => {
                    const b = p.getBoundingClientRect();
                    out.push({trace: t, row: gd._fullData[t].customdata[i], x: b.x + b.width / 2, y: b.y + b.height / 2});
                });
            });
            return out;
        }""")  # noqa: E501 - JavaScript source
        assert len(points) == len(coords)
        xy = np.array([[p["x"], p["y"]] for p in points])
        gaps = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
        target = points[int(gaps.min(axis=1).argmax())]  # the most isolated point: no ambiguity
        row = target["row"]

        # The drawn position is the row's map position: screen x grows with coords x, y inverted.
        rows = np.array([p["row"] for p in points])
        assert np.corrcoef(xy[:, 0], coords[rows, 0])[0, 1] > 0.999
        assert np.corrcoef(xy[:, 1], coords[rows, 1])[0, 1] < -0.999

        page.mouse.move(target["x"], target["y"])
        tooltip = page.locator("#lm-tooltip")
        tooltip.wait_for(state="visible")
        shown = _decoded(tooltip.locator("img").get_attribute("src"))
        expected = Image.open(files[indices[row]]).convert("RGB")
        expected.thumbnail((40, 40))
        np.testing.assert_array_equal(shown, np.asarray(expected))
        assert tooltip.locator(".lm-label").inner_text() == classes[labels[row]]
        assert tooltip.locator(".lm-index").inner_text() == f"index {indices[row]}"
        file = files[indices[row]]
        assert tooltip.locator(".lm-file").inner_text() == f"{file.parent.name}/{file.name}"  # the file to find
        x_text, y_text = tooltip.locator(".lm-xy").inner_text().strip("()").split(", ")
        assert float(x_text) == pytest.approx(coords[row, 0], rel=1e-3, abs=1e-3)
        assert float(y_text) == pytest.approx(coords[row, 1], rel=1e-3, abs=1e-3)

        page.mouse.click(target["x"], target["y"])
        panel = page.locator("#lm-neighbours figure")
        panel.first.wait_for()
        listed = [int(f.get_attribute("data-row")) for f in panel.all()]
        reference, _ = cosine_knn(embeddings.astype(np.float64), 4)
        assert listed == reference[row].tolist()
        wrong = [f.get_attribute("class") == "lm-wrong" for f in panel.all()]
        assert wrong == [bool(labels[n] != labels[row]) for n in listed]
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))

        hidden_class = int(labels[row])
        count_drawn = """() => Array.from(document.getElementById('lm-map')._fullData, (trace) => {
            const group = document.querySelector('.scatterlayer .trace' + trace.uid);
            return group ? group.querySelectorAll('path.point').length : 0; })"""
        before = page.evaluate(count_drawn)
        assert before == [int((labels == c).sum()) for c in range(len(classes))]
        page.locator(".legend .traces").nth(hidden_class).click()
        page.wait_for_function(f"document.getElementById('lm-map').data[{hidden_class}].visible === 'legendonly'")
        drawn = page.evaluate(count_drawn)  # the hidden class's points are gone; the others stay
        assert drawn == [0 if c == hidden_class else n for c, n in enumerate(before)]
        page.locator(".legend .traces").nth(hidden_class).click()  # and back
        page.wait_for_function(f"document.getElementById('lm-map').data[{hidden_class}].visible !== 'legendonly'")
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


@contextmanager
def _pages():
    """One Chromium for a test: yields ``open(path, width, height=800)``, a context manager giving a
    new page of that size showing the file, every network request refused (a test that checks several
    widths launches the browser once: about a second a launch)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])

        @contextmanager
        def open_page(path: Path, width: int, height: int = 800):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.route("http*://**", lambda route: route.abort())
            page.goto(path.as_uri())
            try:
                yield page
            finally:
                page.close()

        try:
            yield open_page
        finally:
            browser.close()


@contextmanager
def _map_page(path: Path, width: int, height: int = 800):
    """A Chromium page of ``width`` x ``height`` px showing the file, every network request refused."""
    with _pages() as open_page, open_page(path, width, height) as page:
        yield page


_ISOLATED_POINT = """() => {
    const gd = document.getElementById('lm-map'), out = [];
    document.querySelectorAll('.scatterlayer .trace').forEach((trace, t) => {
        trace.querySelectorAll('path.point').forEach((p, i) => {
            const b = p.getBoundingClientRect();
            out.push({row: gd._fullData[t].customdata[i], x: b.x + b.width / 2, y: b.y + b.height / 2});
        });
    });
    let best = null, bestGap = -1;
    for (const a of out) {
        let gap = Infinity;
        for (const b of out) if (a !== b) gap = Math.min(gap, Math.hypot(a.x - b.x, a.y - b.y));
        if (gap > bestGap) { bestGap = gap; best = a; }
    }
    return best;
}"""


def test_the_neighbour_panel_is_on_top_after_a_click_at_every_width(looked_run):
    """Click a point: the neighbour panel lists its neighbours, in view, on top of everything at its
    centre (the plot, sized before the panel had content, once covered it), and beside the plot or
    below it, never under it, at 700 to 1,600 px. Screenshots at 1,000 and 1,400 px are kept."""
    artifacts, _, _ = looked_run
    with _pages() as open_page:
        for width in (700, 1000, 1400, 1600):
            _neighbour_panel_at(open_page, artifacts / "map.html", width)


def _neighbour_panel_at(open_page, path: Path, width: int) -> None:
    with open_page(path, width) as page:
        page.wait_for_selector(".scatterlayer .trace path.point")
        target = page.evaluate(_ISOLATED_POINT)
        page.mouse.click(target["x"], target["y"])
        page.locator("#lm-neighbours figure").first.wait_for()
        found = page.evaluate("""() => {
            const panel = document.getElementById('lm-neighbours').getBoundingClientRect();
            const plot = document.querySelector('#lm-map .main-svg').getBoundingClientRect();
            const x = panel.left + panel.width / 2, y = Math.min(panel.top + panel.height / 2, window.innerHeight - 2);
            const hit = document.elementFromPoint(x, y);
            return {onTop: !!(hit && hit.closest('#lm-neighbours')), listed: document.querySelectorAll('#lm-neighbours figure').length,
                    beside: plot.right <= panel.left + 1, below: plot.bottom <= panel.top + 1,
                    inView: panel.top < window.innerHeight && panel.bottom > 0, width: panel.width,
                    pageWidth: document.documentElement.scrollWidth,
                    tooltip: document.getElementById('lm-tooltip').style.display};
        }""")  # noqa: E501 - JavaScript source
        if width in (1000, 1400):
            page.screenshot(path=str(SCREENSHOT.with_name(f"map-click-{width}.png")))
    assert found["onTop"] and found["inView"] and found["listed"] == 4, (width, found)
    assert (found["beside"] if width > 820 else found["below"]), (width, found)  # its own column, or below
    assert found["width"] >= 240 and found["pageWidth"] <= width, (width, found)  # no sideways scrolling
    assert found["tooltip"] == "none", (width, found)  # the hover tooltip, which covered the panel's edge, is gone


def test_map_above_max_points_shows_a_stratified_subsample_and_says_so(class_folder, tmp_path):
    import re

    run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                 "metrics.k=5", "plots.map_max_points=12", "plots.neighbours=3", "metrics.probe=false"], tmp_path))
    client, runs = mlflow_runs(tmp_path)
    page = Path(client.download_artifacts(runs[0].info.run_id, "map.html")).read_text()
    payload = json.loads(re.search(r'<script type="application/json" id="lm-data">(.*?)</script>', page,
                                   re.DOTALL).group(1).replace("<\\/", "</"))
    shown = np.frombuffer(base64.b64decode(payload["index"]), np.int32)  # compact: base64 int32
    assert len(shown) == 12 and len(set(shown)) == 12
    labels = np.frombuffer(base64.b64decode(payload["label"]), np.uint8)
    assert np.bincount(labels).tolist() == [3, 3, 3, 3]
    assert "A seeded, class-stratified subsample of 12 of 32 points" in page
    assert "All 12 points have a thumbnail" in page and len(payload["thumbs"]) == 12
    assert all(len(row) == 3 and all(0 <= n < 12 for n in row) for row in payload["neighbours"].values())


def test_a_map_of_100000_points_in_the_browser(tmp_path):
    """100,000 points drawn with WebGL: first draw timed, a thumbnailed point hovers with its image and
    clicks to its neighbours, a point without a thumbnail says so, a legend click hides a class fast."""
    import time

    from latentmap import interactive

    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    rng = np.random.default_rng(0)
    n, classes = 100_000, [f"class {c}" for c in range(10)]
    labels = rng.integers(0, 10, n)
    coords = (rng.normal(size=(10, 2))[labels] * 6 + rng.normal(size=(n, 2))).astype(np.float32)
    indices = np.arange(n) * 3 + 7  # dataset indices that are not the rows
    thumb_rows = np.sort(rng.choice(n, 300, replace=False))
    lone_thumbed, lone_plain = thumb_rows[5], int(np.setdiff1d(np.arange(n), thumb_rows)[0])
    coords[lone_thumbed], coords[lone_plain] = (40, 40), (-40, -40)  # far from every other point
    images = [np.full((8, 8, 3), (r % 256, (r // 256) % 256, 9), dtype=np.uint8) for r in thumb_rows]
    uris = [plots.png_data_uri(image) for image in images]
    found = rng.integers(0, 300, (300, 4))
    page_file = tmp_path / "map.html"
    page_file.write_text(interactive.map_html(coords, labels, classes, indices, thumb_rows, uris, found,
                                              plots.class_colors(10), "100k", "", "cosine"))
    assert page_file.stat().st_size < 10e6  # 4.7 MB of Plotly, 16 bytes a point, the thumbnails

    screen = """([x, y]) => { const gd = document.getElementById('lm-map'), box = gd.getBoundingClientRect();
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [box.left + xa._offset + xa.l2p(x), box.top + ya._offset + ya.l2p(y)]; }"""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 860})
        page.route("http*://**", lambda route: route.abort())
        page.goto(page_file.as_uri())
        page.wait_for_function("window.lmFirstDraw !== undefined", timeout=60_000)
        first_draw_ms = page.evaluate("window.lmFirstDraw")
        assert page.evaluate("document.querySelector('#lm-map .gl-canvas-context') !== null")  # WebGL
        drawn = page.evaluate("document.getElementById('lm-map')._fullData.map((t) => t._length)")
        assert drawn[:10] == [int((labels == c).sum()) for c in range(10)] and drawn[10] == 300  # + the rings

        x, y = page.evaluate(screen, coords[lone_thumbed].tolist())
        page.mouse.move(x, y)
        tooltip = page.locator("#lm-tooltip")
        tooltip.wait_for(state="visible")
        np.testing.assert_array_equal(_decoded(tooltip.locator("img").get_attribute("src")), images[5])
        assert tooltip.locator(".lm-label").inner_text() == classes[labels[lone_thumbed]]
        assert tooltip.locator(".lm-index").inner_text() == f"index {indices[lone_thumbed]}"
        page.mouse.click(x, y)
        page.locator("#lm-neighbours figure").first.wait_for()
        listed = [int(f.get_attribute("data-row")) for f in page.locator("#lm-neighbours figure").all()]
        assert listed == thumb_rows[found[5]].tolist()

        x, y = page.evaluate(screen, coords[lone_plain].tolist())
        page.mouse.move(x, y)
        page.wait_for_function(f"document.getElementById('lm-tooltip').dataset.row === '{lone_plain}'")
        assert tooltip.locator(".lm-nothumb").count() == 1
        assert tooltip.locator(".lm-index").inner_text() == f"index {indices[lone_plain]}"

        start = time.perf_counter()
        page.locator(".legend .traces").nth(3).click()
        page.wait_for_function("document.getElementById('lm-map')._fullData[3].visible === 'legendonly'")
        toggle_s = time.perf_counter() - start
        browser.close()
    print(f"map of {n} points: {page_file.stat().st_size / 1e6:.1f} MB, first draw {first_draw_ms:.0f} ms, "
          f"legend toggle {toggle_s * 1000:.0f} ms")
    # Timings are reported, not asserted (scripts/bench.py --only map measures them side by side).


def test_map_fills_its_frame_with_the_legend_in_view(looked_run):
    """At MLflow's artifact-view width (about 715 px) and on a wide screen, the plot spans most of the
    frame without overflowing it, and the legend lies inside the frame, clear of Plotly's toolbar."""
    artifacts, _, _ = looked_run
    with _pages() as open_page:
        for width in (715, 1600):
            _frame_filled_at(open_page, artifacts / "map.html", width)


def _frame_filled_at(open_page, path: Path, width: int) -> None:
    with open_page(path, width) as page:
        page.wait_for_selector(".legend .traces")
        boxes = page.evaluate("""() => {
            const box = (el) => { const b = el.getBoundingClientRect();
                                  return {left: b.left, right: b.right, top: b.top, bottom: b.bottom, width: b.width}; };
            return {plot: box(document.querySelector('#lm-map .main-svg')),
                    legend: box(document.querySelector('#lm-map .legend')),
                    toolbar: box(document.querySelector('#lm-map .modebar')),
                    page: document.documentElement.scrollWidth};
        }""")  # noqa: E501 - JavaScript source
    plot, legend, toolbar = boxes["plot"], boxes["legend"], boxes["toolbar"]
    assert boxes["page"] <= width, (width, boxes)  # no horizontal scrolling
    assert 0.5 * width <= plot["width"] <= width and plot["right"] <= width, (width, boxes)
    assert 0 <= legend["left"] and legend["right"] <= width and legend["width"] > 50, (width, boxes)
    overlap = not (legend["right"] < toolbar["left"] or toolbar["right"] < legend["left"]
                   or legend["bottom"] < toolbar["top"] or toolbar["bottom"] < legend["top"])
    assert not overlap, (width, boxes)


def _hovered_label(page, point: np.ndarray) -> str:
    """The tooltip's class name after the mouse moves onto the map at data coordinates ``point``."""
    at = page.evaluate("""([x, y]) => { const gd = document.getElementById('lm-map');
        const b = gd.getBoundingClientRect(), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
        return [b.left + xa._offset + xa.l2p(x), b.top + ya._offset + ya.l2p(y)]; }""", point.tolist())
    page.mouse.move(*at)
    page.locator("#lm-tooltip").wait_for(state="visible")
    return page.locator("#lm-tooltip .lm-label").inner_text()


def test_long_class_names_leave_the_map_its_width_and_are_whole_in_the_tooltip(tmp_path):
    """Class folders of 80 characters: map.html's legend beside the plot left the plot about 80 px of
    a 1,000-px window. The legend cuts each name with an ellipsis (the plot keeps over half the
    window); the tooltip shows the name whole."""
    from latentmap import interactive

    names = [(f"class {c} " + "of a very long folder name " * 3).strip() for c in range(4)]
    labels = np.repeat(np.arange(4), 5)
    centres = np.array([[10, 0], [0, 10], [-10, 0], [0, -10]])
    coords = (np.repeat(centres, 5, axis=0) + np.random.default_rng(0).normal(size=(20, 2))).astype(np.float32)
    rows = np.arange(20)
    uris = [plots.png_data_uri(np.zeros((4, 4, 3), np.uint8))] * 20
    page_file = tmp_path / "map.html"
    page_file.write_text(interactive.map_html(coords, labels, names, rows, rows, uris, np.zeros((20, 2), int),
                                              plots.class_colors(4), "names"))
    with _pages() as open_page, open_page(page_file, 1000) as page:
        page.wait_for_function("window.lmFirstDraw !== undefined", timeout=60_000)
        legend = page.evaluate("[...document.querySelectorAll('#lm-map .legendtext')].map((t) => t.textContent)")
        assert all(len(t) <= plots.NAME_CHARACTERS["legend"] and t.endswith("\u2026") for t in legend[:4]), legend
        plot, frame = page.evaluate("[document.getElementById('lm-map')._fullLayout.xaxis._length, "
                                    "document.getElementById('lm-map')._fullLayout.width]")
        assert plot >= 0.5 * frame, (plot, frame)  # 63% here; 76% with one-letter names; 80 px before
        assert _hovered_label(page, coords[0]) == names[0]


def test_class_names_with_markup_are_shown_as_written_in_map_html(tmp_path):
    """Plotly reads tags in a legend entry and a text ("a<b>c" was drawn "ac" with a bold "c",
    "x<br>y" on two lines): class names and class prompts reach the page escaped, and Chromium's
    legend, tooltip and stars show them as written."""
    from latentmap import interactive

    names = ["a<b>c", "x<br>y", 'R&D 12" pizza', "<!--<script>"]  # the last left the whole page blank
    labels = np.repeat(np.arange(4), 5)
    centres = np.array([[10, 0], [0, 10], [-10, 0], [0, -10]])
    coords = (np.repeat(centres, 5, axis=0) + np.random.default_rng(0).normal(size=(20, 2))).astype(np.float32)
    rows = np.arange(20)
    uris = [plots.png_data_uri(np.zeros((4, 4, 3), np.uint8))] * 20
    prompts = [('a photo of a<b>c "x"', 5.0, 5.0)]
    page_file = tmp_path / "map.html"
    page_file.write_text(interactive.map_html(coords, labels, names, rows, rows, uris, np.zeros((20, 2), int),
                                              plots.class_colors(4), "names", texts=prompts))
    with _pages() as open_page, open_page(page_file, 1000) as page:
        page.wait_for_function("window.lmFirstDraw !== undefined", timeout=60_000)
        legend = page.evaluate("[...document.querySelectorAll('#lm-map .legendtext')].map((t) => t.textContent)")
        assert legend[:4] == names, legend
        stars = page.evaluate("[...document.querySelectorAll('#lm-map .textpoint text')].map((t) => t.textContent)")
        assert stars == [prompts[0][0]], stars
        assert _hovered_label(page, coords[0]) == names[0]
        # a thin thumbnail keeps its shape in the 64-px box (a 20x400 strip was drawn as a square)
        assert page.evaluate("getComputedStyle(document.querySelector('#lm-tooltip img')).objectFit") == "contain"
