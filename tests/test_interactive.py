"""latentmap.interactive: map.html's data, its controls and its thumbnail budget, read back from
the page's own JSON (the page driven in a real browser: test_look.py)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
from PIL import Image

from latentmap import interactive, plots


def _payload(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="lm-data">(.*?)</script>', page, re.S)[1])


def _decoded(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def test_the_page_holds_every_point_its_label_index_thumbnail_and_neighbours():
    """Labels and dataset indices travel as base64 arrays that decode to the inputs; each
    thumbnailed row carries its image (the PNG decodes to the thumbnail given) and its neighbours as
    rows of the points; an audit column gets its colour-by option, one the page does not know does
    not; the page loads nothing from elsewhere and a class name cannot close its script."""
    rng = np.random.default_rng(0)
    n = 60
    coords, labels = rng.normal(size=(n, 2)).astype(np.float32), rng.integers(0, 3, n)
    indices = np.arange(n) * 3 + 7  # not the rows: they travel
    thumb_rows = np.array([2, 5, 11, 40])
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in thumb_rows]
    neighbours = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])  # positions in thumb_rows
    columns = {"label_issue": (np.arange(n) % 5 == 0), "not_a_column": np.zeros(n)}
    classes = ["a", "b </script> c", "<c>"]  # a name cannot close the page's script
    page = interactive.map_html(coords, labels, classes, indices, thumb_rows,
                                [plots.png_data_uri(image) for image in images], neighbours,
                                plots.class_colors(3), "map of digits", "a note", "cosine", columns)
    data = _payload(page)
    np.testing.assert_array_equal(_decoded(data["label"], np.uint8), labels)
    np.testing.assert_array_equal(_decoded(data["index"], np.int32), indices)
    assert data["classes"] == classes and data["n_thumbs"] == 4 and data["k"] == 2
    for row, image in zip(thumb_rows, images):
        shown = Image.open(io.BytesIO(base64.b64decode(data["thumbs"][str(row)].split(",", 1)[1])))
        np.testing.assert_array_equal(np.asarray(shown.convert("RGB")), image)
    assert data["neighbours"] == {str(r): thumb_rows[found].tolist() for r, found in zip(thumb_rows, neighbours)}
    assert set(data["columns"]) == {"label_issue"}
    np.testing.assert_array_equal(_decoded(data["columns"]["label_issue"]["data"], np.int8) > 0,
                                  columns["label_issue"])
    assert '<option value="label_issue">' in page and "not_a_column" not in page
    assert "<script src=" not in page and "4 of the 60 points" in page
    assert page.count("</script>") == page.count("<script")
    assert data["files"] is None  # no file names given: none shown
    named = interactive.map_html(coords, labels, classes, indices, thumb_rows,
                                 [plots.png_data_uri(image) for image in images], neighbours,
                                 plots.class_colors(3), "map", "", "cosine", None, None,
                                 ["a/1.png", "b/</script>.png", "c/3.png", "d/4.png"])
    assert _payload(named)["files"] == {"2": "a/1.png", "5": "b/</script>.png", "11": "c/3.png", "40": "d/4.png"}
    assert named.count("</script>") == named.count("<script")  # a file name cannot close the page's script


def test_thumbnails_fill_the_page_budget_in_the_order_given():
    """Thumbnails are added in the order given while the page stays within plots.map_max_mb: here
    130,000 points whose dataset indices are not their rows (so they travel too) and a 10 MB budget."""
    from latentmap import interactive

    rng = np.random.default_rng(0)
    n = 130_000
    images = [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(50)]
    labels = rng.integers(0, 12, n)
    order = rng.permutation(n)[:5000]
    decoded = []

    def decode(rows):
        decoded.extend(rows)
        return [images[r % 50] for r in rows]

    page, kept = interactive.page_within(
        rng.normal(size=(n, 2)).astype(np.float32), labels, [f"c{c}" for c in range(12)], np.arange(n) * 2 + 1,
        order, decode, lambda rows: rng.integers(0, len(rows), (len(rows), 8)), 8, plots.class_colors(12), "t", "",
        "cosine", 10)
    size = len(page.encode())
    assert 0 < len(kept) < len(order) and size <= 10e6 and size > 9.9e6  # full, and not over
    np.testing.assert_array_equal(kept, order[: len(kept)])  # in the order given
    assert f"{len(kept)} of the {n} points" in page and len(decoded) < len(kept) + 500  # decoded as needed
    files = {int(r): f"class{r % 12}/image_{r:06d}.png" for r in order}  # each thumbnail's name counted
    named, kept_named = interactive.page_within(
        rng.normal(size=(n, 2)).astype(np.float32), labels, [f"c{c}" for c in range(12)], np.arange(n) * 2 + 1,
        order, decode, lambda rows: rng.integers(0, len(rows), (len(rows), 8)), 8, plots.class_colors(12), "t", "",
        "cosine", 10, files=files)
    assert 0 < len(kept_named) < len(kept) and len(named.encode()) <= 10e6
    assert _payload(named)["files"][str(kept_named[0])] == files[int(kept_named[0])]


def test_thumbnails_encoded_side_by_side_are_the_one_by_one_encoding_in_order():
    """fit_thumbnails encodes a chunk's PNGs in threads: the rows kept and their data URIs equal the
    one-at-a-time loop's (each row's own PNG, in the order given, stopping at the first that does
    not fit), across several chunks."""
    rng = np.random.default_rng(3)
    images = {row: rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) // (1 + row % 7) for row in range(1300)}
    rows = rng.permutation(1300)

    def decode(part):
        return [images[int(r)] for r in part]

    expected_rows, expected_uris, used, extra, budget = [], [], 0, 30, 5_000_000
    for row in rows:  # the reference: one at a time, in order
        uri = plots.png_data_uri(images[int(row)])
        if used + len(uri) + extra > budget:
            break
        used += len(uri) + extra
        expected_rows.append(int(row))
        expected_uris.append(uri)
    assert 500 < len(expected_rows) < 1300  # the budget ends inside a later chunk
    kept, uris = interactive.fit_thumbnails(rows, decode, budget, extra, chunk=200)
    assert kept.tolist() == expected_rows and uris == expected_uris
