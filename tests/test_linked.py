"""compare.html (latentmap.linked): runs on the same images side by side, linked, in a real browser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from latentmap import linked, plots
from latentmap.errors import ConfigError

from helpers import ROOT
from test_look import _map_page, _pages

SCREENSHOTS = ROOT / "outputs" / "test-screenshots"


def test_procrustes_recovers_a_turned_scaled_shifted_map():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 2))
    angle = 0.7
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([1, -1])
    moved = base @ turn * 3.5 + [10, -4]
    np.testing.assert_allclose(linked.procrustes_align(moved, base), base, atol=1e-9)
    maps = linked.aligned([linked.Map("a", base), linked.Map("b", moved)])
    np.testing.assert_allclose(maps[1].coords, base, atol=1e-5)
    assert maps[1].title == "b (Procrustes-aligned to A)" and maps[0].title == "a"
    together = linked.aligned([linked.Map("a", base), linked.Map("b", moved)], already=True)
    assert together[1].coords is moved and together[1].title == "b (aligned UMAP)"


def test_runs_on_other_images_are_refused_in_one_line():
    rows = np.arange(10)
    linked.check_same_images(["a", "b"], ["f", "f"], [rows, rows.copy()])  # the same: accepted
    for fingerprints, indices, words in (
            (["f", "g"], [rows, rows], "other datasets"),
            (["f", "f"], [rows, rows[:8]], "(10 and 8, 8 dataset indices shared)"),
            (["f"] * 7, [rows] * 7, "2 to 6 runs, got 7"), (["f"], [rows], "2 to 6 runs, got 1")):
        with pytest.raises(ConfigError) as error:
            linked.check_same_images(["a", "b", "c", "d", "e", "f", "g"][: len(indices)], fingerprints, indices)
        assert words in str(error.value) and "\n" not in str(error.value)


def test_neighbours_kept_and_outcomes_equal_their_definitions():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(1)
    a = rng.normal(size=(120, 8))
    b = a + rng.normal(scale=0.6, size=a.shape)
    kept = linked.neighbours_kept(a, b, 5, "euclidean")
    sets = [NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x)[1][:, 1:] for x in (a, b)]
    expected = [len(set(sets[0][i]) & set(sets[1][i])) / 5 for i in range(len(a))]
    np.testing.assert_allclose(kept, expected)
    assert 0 < kept.mean() < 1
    assert (linked.neighbours_kept(a, a, 5, "cosine") == 1).all()
    codes = linked.outcome(np.array([1, 1, 0, 0, np.nan]), np.array([1, 0, 1, 0, 1]))
    assert codes.tolist() == [0, 1, 2, 3, -1]


def test_differences_line_up_scored_images_by_dataset_index():
    """Per-image tables in another row order than the page, and scoring only some images: each
    difference lands on its own image's row, the others are 'not scored'."""
    import pandas as pd

    rng = np.random.default_rng(2)
    n = 60
    embeddings = [rng.normal(size=(n, 4)), rng.normal(size=(n, 4))]
    scored = rng.permutation(n)[:40]  # the page's rows that were scored, in the tables' order
    right_a = rng.integers(0, 2, 40).astype(float)
    right_b = rng.integers(0, 2, 40).astype(float)
    trust_a, trust_b = rng.random(40), rng.random(40)
    tables = [pd.DataFrame({"index": 1000 + scored, "label": 0, "knn_acc_hd": right, "trustworthiness": trust,
                            "row": scored}) for right, trust in ((right_a, trust_a), (right_b, trust_b))]
    columns = linked.differences(embeddings, tables, "euclidean", 5)
    by_kind = {c.kind: c for c in columns}
    assert [c.label for c in columns] == ["k-NN right or wrong, A vs B", "5 nearest neighbours kept, A vs B",
                                          "change in trustworthiness, B - A"]
    expected = linked.outcome(right_a, right_b)
    assert by_kind["outcome"].values[scored].tolist() == expected.tolist()
    others = np.setdiff1d(np.arange(n), scored)
    assert (by_kind["outcome"].values[others] == -1).all() and np.isnan(by_kind["change"].values[others]).all()
    np.testing.assert_allclose(by_kind["change"].values[scored], trust_b - trust_a, rtol=1e-6)
    # a score the same for every image in both runs (one embedding under two maps) offers no colouring
    same = [t.assign(silhouette_hd=0.25) for t in tables]
    labels = [c.label for c in linked.differences(embeddings, same, "euclidean", 5)]
    assert "change in trustworthiness, B - A" in labels and "change in silhouette_hd, B - A" not in labels
    order = np.sort(scored)
    np.testing.assert_allclose(by_kind["share"].values[order],
                               linked.neighbours_kept(embeddings[0][order], embeddings[1][order], 5, "euclidean"))


def _three_maps(n: int, seed: int = 0):
    """Three maps of the same n images: A, B (A turned and noisy) and C (A reflected)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), n // 4)
    centres = np.array([[0, 0], [6, 0], [0, 6], [6, 6]], float)
    a = centres[labels] + rng.normal(size=(n, 2))
    turn = np.array([[0, -1], [1, 0]], float)
    b = (a + rng.normal(scale=0.4, size=a.shape)) @ turn * 2
    c = a * [-1, 1] + 3
    return labels, [a.astype(np.float32), b.astype(np.float32), c.astype(np.float32)]


def _page_of(n: int, thumbs: int = 20):
    labels, coords = _three_maps(n)
    # class prompts as stars, one with markup Plotly would read ("a<b>c" drawn "ac"): shown as written
    # and one that put the HTML parser in a state where the data's script never ended (a blank page)
    words = ("zero", 'a<b>c "one"', "<!--<script>")
    texts = [[(name, float(x), float(y)) for name, (x, y) in zip(words, xy[[0, 1, 2]])] for xy in coords]
    maps = linked.aligned([linked.Map(t, xy, texts=words) for t, xy, words in
                           zip(("block 0", "block 5", "block 9"), coords, texts)])
    rng = np.random.default_rng(3)
    right = [rng.integers(0, 2, n).astype(float) for _ in range(3)]
    right[0][::7] = np.nan  # not scored in A (outside its metric sample, say)
    columns = [linked.Column("k-NN right or wrong, A vs B", "outcome", linked.outcome(right[0], right[1]), ("A", "B")),
               linked.Column("8 nearest neighbours kept, A vs B", "share", rng.random(n).astype(np.float32)),
               linked.Column("change in trustworthiness, B - A", "change",
                             rng.normal(size=n).astype(np.float32))]
    images = {row: plots.png_data_uri(np.full((8, 8, 3), 40 * (labels[row] + 1), np.uint8)) for row in range(thumbs)}
    names = ["zero", "one", "two", "three"]
    import pandas as pd

    from latentmap.measures import Similarity

    metrics_ = ["trustworthiness", "continuity", "silhouette_2d", "knn_acc_2d", "probe_balanced_acc", "twonn_id"]
    table = pd.DataFrame({"metric": metrics_, "a": 0.8512, "b": 15.6812, "difference": -0.0814, "lo": -0.1023,
                          "hi": -0.0601, "p_value": 0.00012, "p_holm": 0.00072})
    panel = {m: Similarity(m, 0.304, 0.272, 0.348, 0.00498, 0.039, 0.05, 300)
             for m in ("cka", "cka_debiased", "mutual_knn", "rsa", "procrustes")}
    numbers = "".join(linked.numbers_html(("A", x), (f"block 0 · {names[0]} · a long run name", f"block {x}"),
                                          table, panel, 0.95) for x in "BC")
    page = linked.page(maps, labels, names, np.arange(n) + 500, columns, images, numbers,
                       "compare: A = block 0; B = block 5; C = block 9", "aligned by Procrustes",
                       plots.class_colors(4))
    return page, maps, labels, columns, names


_SCREEN = """([map, row]) => {  // a row's centre on screen in one map
    const gd = window.lmCompare.plots[map], xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    const box = gd.getBoundingClientRect();
    return [box.left + xa._offset + xa.l2p(gd.data[0].x[row]), box.top + ya._offset + ya.l2p(gd.data[0].y[row])];
}"""


def test_compare_page_links_hover_selection_and_colour_in_a_real_browser(tmp_path):
    """Three maps of 400 images. Hover an image in A with the mouse: its thumbnail and label show,
    and it is ringed at its own position in B and C. Drag a box in B: the images inside are
    selected in A and C too, and listed. Colour by the k-NN outcome: each point takes its outcome's
    colour in every map. The maps sit side by side, none clipped, nothing scrolls sideways: at 1,000
    and 1,600 px."""
    page_of = _page_of(400)
    path = tmp_path / "compare.html"
    path.write_text(page_of[0])
    with _pages() as open_page:
        for width in (1000, 1600):
            _linked_at(open_page, path, page_of, width)


def _linked_at(open_page, path, page_of, width: int) -> None:
    _, maps, labels, columns, names = page_of
    n = len(labels)
    with open_page(path, width, 900) as page:
        page.wait_for_function("window.lmCompare && window.lmCompare.plots.every((gd) => gd._fullLayout)")
        boxes = [page.locator(f"#lm-map-{i}").bounding_box() for i in range(3)]
        assert all(b["width"] > 280 and b["height"] >= 300 for b in boxes)
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert all(b["x"] + b["width"] <= width for b in boxes)
        if width == 1600:  # three maps in one row on a wide screen
            assert len({round(b["y"]) for b in boxes}) == 1
        # every table beside the maps shows all its columns (none cut off behind a scroll bar)
        clipped = page.evaluate("Array.from(document.querySelectorAll('#lm-numbers table'))"
                                ".filter((t) => t.scrollWidth > t.clientWidth + 1).length")
        assert page.locator("#lm-numbers table").count() == 4 and clipped == 0
        stars = page.evaluate("[...document.querySelectorAll('#lm-map-0 .textpoint text')].map((t) => t.textContent)")
        assert stars == ["zero", 'a<b>c "one"', "<!--<script>"], stars

        # Hover: the most isolated point of A (no neighbour under the cursor with it).
        a = maps[0].coords
        gaps = np.linalg.norm(a[:, None] - a[None], axis=2) + np.eye(n) * 1e9
        row = int(gaps.min(axis=1).argmax())
        page.locator("#lm-map-0").scroll_into_view_if_needed()
        x, y = page.evaluate(_SCREEN, [0, row])
        page.mouse.move(x, y)
        page.wait_for_function(f"document.body.dataset.hovered === '{row}'")
        tip = page.locator("#lm-tooltip")
        assert tip.is_visible() and tip.locator(".lm-label").inner_text() == names[labels[row]]
        assert f"index {row + 500}" in tip.inner_text()
        for m in (1, 2):  # ringed at the same image's place in the other maps, on screen
            ring = page.locator(f"#lm-map-{m} ~ .lm-ring")
            assert ring.is_visible()
            np.testing.assert_allclose([float(ring.get_attribute("data-x")), float(ring.get_attribute("data-y"))],
                                       maps[m].coords[row], rtol=1e-5)
            box = ring.bounding_box()
            np.testing.assert_allclose([box["x"] + box["width"] / 2, box["y"] + box["height"] / 2],
                                       page.evaluate(_SCREEN, [m, row]), atol=1.5)
        page.mouse.move(0, 0)
        page.wait_for_function("document.body.dataset.hovered === undefined")
        assert not any(page.locator(".lm-ring").nth(i).is_visible() for i in range(3))

        # Box selection in B, by mouse.
        page.evaluate("Plotly.relayout(window.lmCompare.plots[1], {dragmode: 'select'})")
        b = maps[1].coords
        centre = b[labels == 2].mean(0)
        corner_from, corner_to = centre - 1.5, centre + 1.5
        page.locator("#lm-map-1").scroll_into_view_if_needed()
        start = page.evaluate("""([lo, hi]) => {
            const gd = window.lmCompare.plots[1], xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
            const box = gd.getBoundingClientRect();
            return [box.left + xa._offset + xa.l2p(lo[0]), box.top + ya._offset + ya.l2p(lo[1]),
                    box.left + xa._offset + xa.l2p(hi[0]), box.top + ya._offset + ya.l2p(hi[1])];
        }""", [corner_from.tolist(), corner_to.tolist()])
        page.mouse.move(start[0], start[1])
        page.mouse.down()
        page.mouse.move((start[0] + start[2]) / 2, (start[1] + start[3]) / 2, steps=5)
        page.mouse.move(start[2], start[3], steps=5)
        page.mouse.up()
        page.wait_for_function("Number(document.body.dataset.selected) > 0")
        drawn = page.evaluate("window.lmCompare.range")  # the box Plotly selected, in map units
        low = np.array([min(drawn["x"]), min(drawn["y"])])
        high = np.array([max(drawn["x"]), max(drawn["y"])])
        np.testing.assert_allclose(low, corner_from, atol=0.3)  # the box the mouse drew (to a few pixels)
        np.testing.assert_allclose(high, corner_to, atol=0.3)
        inside = np.flatnonzero(np.all((b >= low) & (b <= high), axis=1))
        assert len(inside) > 10
        assert int(page.evaluate("document.body.dataset.selected")) == len(inside)
        for m in (0, 2):  # the same images selected in the other maps
            chosen = page.evaluate(f"Array.from(window.lmCompare.plots[{m}].data[0].selectedpoints)")
            assert sorted(chosen) == inside.tolist()
        listing = page.locator("#lm-selection").inner_text()
        assert f"{len(inside)} images selected in map B" in listing and f"{names[2]} " in listing
        figures = page.locator("#lm-selection figure")
        assert figures.count() == len([r for r in inside if r < 20])  # those with thumbnails

        # Colour by the k-NN outcome: every map, every point, its outcome's colour.
        page.select_option("#lm-colour", "c0")
        page.wait_for_function("document.body.dataset.colourBy === 'c0'")
        colours = {code: colour for code, _, colour in linked.OUTCOMES}
        codes = columns[0].values
        for m in range(3):  # an image not scored: grey and at half size, not read as a scored one
            shown = page.evaluate(f"(({{data}}) => [data[0].marker.color, data[0].marker.size])"
                                  f"(window.lmCompare.plots[{m}])")
            assert shown[0] == [colours.get(int(c), linked.NOT_SCORED) for c in codes]
            assert shown[1] == [6 if c >= 0 else 3 for c in codes] and min(codes) < 0 <= max(codes)
        page.select_option("#lm-colour", "class")  # back to one colour a class and one size
        page.wait_for_function("document.body.dataset.colourBy === 'class'")
        assert page.evaluate("window.lmCompare.plots.map((gd) => gd.data[0].marker.size)") == [6, 6, 6]
        page.select_option("#lm-colour", "c0")
        page.wait_for_function("document.body.dataset.colourBy === 'c0'")
        for m in range(3):  # the class prompts: labelled stars at their aligned places, in every map
            stars = page.evaluate(f"(({{data}}) => [data[1].text, data[1].x, data[1].y])(window.lmCompare.plots[{m}])")
            assert stars[0] == ["zero", 'a&lt;b&gt;c "one"', "&lt;!--&lt;script&gt;"]  # escaped for Plotly, drawn
            np.testing.assert_allclose(np.array(stars[1:]).T, maps[m].coords[[0, 1, 2]], rtol=1e-4, atol=1e-4)
        key = page.locator("#lm-key").inner_text()
        assert "right in A, wrong in B" in key and "wrong in A, right in B" in key
        assert "colours: A vs B, on every map" in key  # three maps: C's too, and the key says so
        assert page.locator("#lm-selection").inner_text().count("%") == 0  # outcome words, not numbers
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"compare-{width}.png"), full_page=True)


def test_a_compare_page_of_100000_images_draws_every_point_within_its_budget(tmp_path):
    """Two maps of 100,000 images: WebGL, every point drawn, the page within 30 MB, drawn in seconds."""
    n = 100_000
    labels, coords = _three_maps(n, seed=4)
    maps = linked.aligned([linked.Map("A", coords[0]), linked.Map("B", coords[1])])
    codes = linked.outcome(np.ones(n), (np.arange(n) % 3 > 0).astype(float))
    text = linked.page(maps, labels, ["w", "x", "y", "z"], np.arange(n), [linked.Column("k-NN", "outcome", codes)],
                       {}, "", "100k", "", plots.class_colors(4))
    path = tmp_path / "compare.html"
    path.write_text(text)
    size_mb = path.stat().st_size / 1e6
    assert size_mb < 30, size_mb
    with _map_page(path, 1400, 900) as page:
        page.wait_for_function("window.lmCompare && window.lmCompare.plots.every((gd) => gd._fullLayout)",
                               timeout=60_000)
        counts = page.evaluate("window.lmCompare.plots.map((gd) => [gd._fullData[0].type, gd.data[0].x.length])")
        assert counts == [["scattergl", n], ["scattergl", n]]
        page.evaluate("window.lmCompare.select(Array.from({length: 5000}, (_, i) => i * 20))")
        assert page.evaluate("window.lmCompare.plots[1].data[0].selectedpoints.length") == 5000
        page.evaluate("window.lmCompare.colour('c0')")
        assert page.evaluate("window.lmCompare.plots[0].data[0].marker.color[0]") == linked.OUTCOMES[1][2]
        drawn_ms = page.evaluate("window.lmFirstDraw")
    (tmp_path / "sizes.json").write_text(json.dumps({"mb": size_mb, "first_draw_ms": drawn_ms}))


def test_compare_page_works_inside_mlflow_s_artifact_view(tmp_path, mlflow_server):
    """compare.html logged to a run of a real ``mlflow server``, opened in MLflow's own UI at the
    run's artifact: the page draws in MLflow's sandboxed frame, hover rings the image in the other
    map and a selection made there reaches both maps."""
    from mlflow.tracking import MlflowClient

    uri = mlflow_server
    text, maps, labels, columns, names = _page_of(200)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("linked", tags={"mlflow.experimentKind": "custom_model_development"})
    run = client.create_run(experiment)
    (tmp_path / "compare.html").write_text(text)
    client.log_artifact(run.info.run_id, str(tmp_path / "compare.html"))
    client.set_terminated(run.info.run_id)
    url = f"{uri}/#/experiments/{experiment}/runs/{run.info.run_id}/artifacts/compare.html"
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    from test_look import _chromium

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        frame_element = page.wait_for_selector("iframe.mlflow-html-iframe", timeout=60_000)
        assert "allow-scripts" in (frame_element.get_attribute("sandbox") or "")
        frame = frame_element.content_frame()
        frame.wait_for_function("window.lmCompare && window.lmCompare.plots.every((gd) => gd._fullLayout)",
                                timeout=60_000)
        box = frame_element.bounding_box()
        assert box["width"] > 600 and box["height"] > 300
        a = maps[0].coords
        gaps = np.linalg.norm(a[:, None] - a[None], axis=2) + np.eye(len(a)) * 1e9
        row = int(gaps.min(axis=1).argmax())
        frame.locator("#lm-map-0").scroll_into_view_if_needed()
        x, y = frame.evaluate(_SCREEN, [0, row])  # in the frame's own coordinates
        inner = frame_element.bounding_box()
        page.mouse.move(inner["x"] + x, inner["y"] + y)
        frame.wait_for_function(f"document.body.dataset.hovered === '{row}'")
        ring = frame.locator("#lm-map-1 ~ .lm-ring")
        assert ring.is_visible()
        np.testing.assert_allclose([float(ring.get_attribute("data-x")), float(ring.get_attribute("data-y"))],
                                   maps[1].coords[row], rtol=1e-5)
        frame.evaluate("window.lmCompare.select([0, 1, 2, 3, 4], 0)")
        assert frame.evaluate("Array.from(window.lmCompare.plots[1].data[0].selectedpoints)") == [0, 1, 2, 3, 4]
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "compare-in-mlflow.png"))
        browser.close()


def test_a_run_s_class_prompts_are_read_back_with_their_names_as_written(tmp_path):
    """compare.html's stars name the classes as the run wrote them: a CSV reader's guesses would
    turn "NA", "None" and an empty name into NaN, "007" into 7 and "1e3" into 1000."""
    import pandas as pd

    names = ["NA", "None", "", "007", "1e3", 'a<b>c "x"']
    table = pd.DataFrame({"class": names, "x": np.arange(6.0), "y": -np.arange(6.0)})

    class Client:  # the one call _texts makes of MLflow's client
        def download_artifacts(self, run_id, path, folder):
            target = Path(folder) / Path(path).name
            table.to_csv(target, index=False)
            return str(target)

    assert linked._texts(Client(), "run") == [(name, float(i), -float(i)) for i, name in enumerate(names)]
