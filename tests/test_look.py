"""Looking closer: nearest neighbours, outlier scores, and map.html driven in a real browser."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, compose, mlflow_runs, write_class_images
from latentmap import neighbours
from latentmap.runner import run

SCREENSHOT = ROOT / "outputs" / "test-artifacts" / "map.png"


def _cosine_knn(points: np.ndarray, k: int) -> np.ndarray:
    """Reference: brute-force cosine distances with scipy, self excluded, nearest first."""
    from scipy.spatial.distance import cdist

    distances = cdist(points, points, "cosine")
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1, kind="stable")[:, :k], np.sort(distances, axis=1)[:, :k]


def test_nearest_and_outlier_scores_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(120, 16)).astype(np.float32)
    labels = rng.integers(0, 3, 120)
    indices, distances = neighbours.nearest(points, 5)
    ref_indices, ref_distances = _cosine_knn(points.astype(np.float64), 5)
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, atol=1e-5)
    queries = np.array([3, 50, 7])
    q_indices, q_distances = neighbours.nearest(points, 5, queries)
    np.testing.assert_array_equal(q_indices, ref_indices[queries])
    np.testing.assert_allclose(q_distances, ref_distances[queries], atol=1e-5)
    scores = neighbours.outlier_scores(indices, distances, labels)
    np.testing.assert_allclose(scores["outlier_score"], ref_distances.mean(axis=1), atol=1e-5)
    expected_share = np.array([np.mean(labels[ref_indices[i]] != labels[i]) for i in range(120)])
    np.testing.assert_allclose(scores["neighbour_disagreement"], expected_share)


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
                    out.push({trace: t, row: gd.data[t].customdata[i], x: b.x + b.width / 2, y: b.y + b.height / 2});
                });
            });
            return out;
        }""")
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
        x_text, y_text = tooltip.locator(".lm-xy").inner_text().strip("()").split(", ")
        assert float(x_text) == pytest.approx(coords[row, 0], rel=1e-3, abs=1e-3)
        assert float(y_text) == pytest.approx(coords[row, 1], rel=1e-3, abs=1e-3)

        page.mouse.click(target["x"], target["y"])
        panel = page.locator("#lm-neighbours figure")
        panel.first.wait_for()
        listed = [int(f.get_attribute("data-row")) for f in panel.all()]
        reference, _ = _cosine_knn(embeddings.astype(np.float64), 4)
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


def test_map_above_max_points_shows_a_stratified_subsample_and_says_so(class_folder, tmp_path):
    import re

    run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                 "metrics.k=5", "plots.map_max_points=12", "plots.neighbours=3", "metrics.probe=false"], tmp_path))
    client, runs = mlflow_runs(tmp_path)
    page = Path(client.download_artifacts(runs[0].info.run_id, "map.html")).read_text()
    payload = json.loads(re.search(r'<script type="application/json" id="lm-data">(.*?)</script>', page,
                                   re.DOTALL).group(1).replace("<\\/", "</"))
    assert len(payload["index"]) == 12 and len(set(payload["index"])) == 12
    assert sorted(payload["label"].count(name) for name in set(payload["label"])) == [3, 3, 3, 3]
    assert "A seeded, class-stratified subsample of 12 of 32 points" in page
    assert all(len(row) == 3 and all(0 <= n < 12 for n in row) for row in payload["neighbours"])


@pytest.mark.parametrize("width", [715, 1600])
def test_map_fills_its_frame_with_the_legend_in_view(looked_run, width):
    """At MLflow's artifact-view width (about 715 px) and on a wide screen, the plot spans most of the
    frame without overflowing it, and the legend lies inside the frame, clear of Plotly's toolbar."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    artifacts, _, _ = looked_run
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 800})
        page.route("http*://**", lambda route: route.abort())
        page.goto((artifacts / "map.html").as_uri())
        page.wait_for_selector(".legend .traces")
        boxes = page.evaluate("""() => {
            const box = (el) => { const b = el.getBoundingClientRect();
                                  return {left: b.left, right: b.right, top: b.top, bottom: b.bottom, width: b.width}; };
            return {plot: box(document.querySelector('#lm-map .main-svg')),
                    legend: box(document.querySelector('#lm-map .legend')),
                    toolbar: box(document.querySelector('#lm-map .modebar')),
                    page: document.documentElement.scrollWidth};
        }""")
        browser.close()
    plot, legend, toolbar = boxes["plot"], boxes["legend"], boxes["toolbar"]
    assert boxes["page"] <= width  # no horizontal scrolling
    assert 0.5 * width <= plot["width"] <= width and plot["right"] <= width
    assert 0 <= legend["left"] and legend["right"] <= width and legend["width"] > 50
    overlap = not (legend["right"] < toolbar["left"] or toolbar["right"] < legend["left"]
                   or legend["bottom"] < toolbar["top"] or toolbar["bottom"] < legend["top"])
    assert not overlap
