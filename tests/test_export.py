"""scripts/neighbors.py and scripts/export.py on a finished run: read back and checked."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentmap.runner import run

from helpers import ROOT, compose, mlflow_runs


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def finished(tmp_path_factory, class_folder):
    out = tmp_path_factory.mktemp("export")
    run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                 "metrics.k=5", "plots.enabled=false", "metrics.probe=false"], out))
    client, runs = mlflow_runs(out)
    artifacts = Path(client.download_artifacts(runs[0].info.run_id, "arrays"))
    arrays = {name: np.load(artifacts / f"{name}.npy") for name in ("embeddings", "coords", "labels", "indices")}
    files = sorted(p for d in sorted(class_folder.iterdir()) for p in d.iterdir())
    return (runs[0].info.run_id, f"sqlite:///{out}/mlflow.db", arrays, files,
            sorted(d.name for d in class_folder.iterdir()))


def test_projector_files_parse_back_in_order(finished, tmp_path):
    run_id, uri, arrays, files, classes = finished
    result = _script("export").main(["projector", run_id, str(tmp_path), "--tracking-uri", uri])
    n = len(arrays["indices"])
    assert result["points"] == n
    tensors = np.loadtxt(tmp_path / "tensors.tsv", delimiter="\t")
    np.testing.assert_allclose(tensors, arrays["embeddings"], rtol=1e-6)
    lines = (tmp_path / "metadata.tsv").read_text().splitlines()
    assert lines[0] == "index\tlabel" and len(lines) == n + 1
    assert [tuple(line.split("\t")) for line in lines[1:]] == \
        [(str(i), classes[c]) for i, c in zip(arrays["indices"], arrays["labels"])]
    sprite = np.asarray(Image.open(tmp_path / "sprite.png").convert("RGB"))
    columns = math.ceil(math.sqrt(n))
    assert sprite.shape == (columns * 32, columns * 32, 3)
    for position in (0, 7, n - 1):  # row-major tiles, the point's own image (32 x 32 files)
        r, c = divmod(position, columns)
        tile = sprite[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32]
        expected = np.asarray(Image.open(files[arrays["indices"][position]]).convert("RGB"))
        np.testing.assert_array_equal(tile, expected)
    config = (tmp_path / "projector_config.pbtxt").read_text()
    for line in ('tensor_path: "tensors.tsv"', 'metadata_path: "metadata.tsv"', 'image_path: "sprite.png"',
                 "single_image_dim: 32"):
        assert line in config


def test_projector_subsamples_when_the_sprite_cannot_hold_every_point(finished, tmp_path, capsys, monkeypatch):
    """Past the sprite's 8192 px a seeded, class-stratified subsample; one that would keep fewer than
    export.FEWEST points (or every point, for a smaller run) is refused, naming the --thumb that fits
    (--thumb 5000 exported 1 point of 150)."""
    run_id, uri, arrays, _, _ = finished
    export = _script("export")
    with pytest.raises(SystemExit, match=r"^error: --thumb 2048: a 8192 x 8192 sprite holds 16 thumbnails of 2048 "
                                         r"px, of the run's 32 points: use --thumb 1365 or less \(room for all 32 "
                                         r"points\)"):
        export.main(["projector", run_id, str(tmp_path), "--tracking-uri", uri, "--thumb", "2048"])
    monkeypatch.setattr(sys.modules[export.projector.__module__], "FEWEST", 16)
    result = export.main(["projector", run_id, str(tmp_path), "--tracking-uri", uri, "--thumb", "2048"])
    assert result == {"points": 16, "of": len(arrays["indices"]), "sprite_px": 8192}
    assert "subsample of 16" in capsys.readouterr().err
    indices = [int(line.split("\t")[0]) for line in (tmp_path / "metadata.tsv").read_text().splitlines()[1:]]
    rows = [int(np.flatnonzero(arrays["indices"] == i)[0]) for i in indices]
    np.testing.assert_allclose(np.loadtxt(tmp_path / "tensors.tsv", delimiter="\t"), arrays["embeddings"][rows],
                               rtol=1e-6)
    assert np.bincount(arrays["labels"][rows]).tolist() == [4, 4, 4, 4]  # class-stratified


def test_parquet_has_one_row_per_image(finished, tmp_path):
    import pandas as pd

    run_id, uri, arrays, _, classes = finished
    _script("export").main(["parquet", run_id, str(tmp_path / "run.parquet"), "--tracking-uri", uri])
    frame = pd.read_parquet(tmp_path / "run.parquet")
    assert list(frame.columns) == ["index", "label", "label_name", "x", "y", "embedding"]
    np.testing.assert_array_equal(frame["index"], arrays["indices"])
    assert frame["label_name"].tolist() == [classes[c] for c in arrays["labels"]]
    np.testing.assert_array_equal(frame[["x", "y"]].to_numpy(), arrays["coords"])
    np.testing.assert_array_equal(np.stack(frame["embedding"].to_numpy()), arrays["embeddings"])


def test_a_target_export_cannot_write_is_one_line_and_leaves_no_file(finished, tmp_path, monkeypatch):
    """A folder where a .parquet file is wanted, a folder that cannot be made, a file where the
    projector wants a folder, and more neighbours than images: one line each, before any work (each
    was a traceback, or a silent clamp); a failed write leaves no half-written file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latentmap.commands import export

    run_id, uri, arrays, _, _ = finished
    (tmp_path / "file").write_text("x")
    for argv, message in ((["parquet", run_id, str(tmp_path)], r"target .* is a folder: name the file to write"),
                          (["atlas", run_id, str(tmp_path / "file" / "a.parquet")],
                           r"target .*a.parquet: .*file is a file, not a folder: choose another place"),
                          (["projector", run_id, str(tmp_path / "file")], r"is a file: the projector export writes"),
                          (["projector", run_id, str(tmp_path / "file" / "sub")], r"file is a file, not a folder"),
                          (["parquet", run_id, "/proc/x.parquet"], r"nothing can be written in /proc"),
                          (["atlas", run_id, str(tmp_path / "at.csv")],
                           r"the atlas export \(Parquet\) is written as .parquet: name the file so, e.g. .*at.parquet"),
                          (["atlas", run_id, str(tmp_path / "a.parquet"), "--k", "1000"],
                           rf"--k 1000 is more neighbours than the run's {len(arrays['indices']) - 1} other images")):
        with pytest.raises(SystemExit, match=message):
            _script("export").main([*argv, "--tracking-uri", uri])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    (tmp_path / "old.parquet").write_bytes(b"the earlier file")

    def fails_halfway(table, where):  # a full disk: part of the file written, then an error
        Path(where).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", fails_halfway)
    with pytest.raises(OSError, match="No space left"):
        export._write_parquet(pa.table({"a": [1, 2]}), tmp_path / "old.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old.parquet"]
    assert (tmp_path / "old.parquet").read_bytes() == b"the earlier file"


def test_neighbors_script_draws_the_cosine_neighbours(finished, tmp_path):
    from scipy.spatial.distance import cdist

    run_id, uri, arrays, _, _ = finished
    row = 5
    out, shown = _script("neighbors").main([run_id, "--index", str(arrays["indices"][row]), "--k", "4",
                                            "--out", str(tmp_path / "n.png"), "--tracking-uri", uri])
    distances = cdist(arrays["embeddings"][[row]], arrays["embeddings"], "cosine")[0]
    distances[row] = np.inf
    assert shown == arrays["indices"][np.argsort(distances, kind="stable")[:4]].tolist()
    assert Image.open(out).size[0] > 400
    # --out a format matplotlib cannot write, or under a file: one line before any work (tracebacks)
    (tmp_path / "file").write_text("x")
    for out_path, message in ((tmp_path / "n.txt", r"the figure is written as .png or .jpg"),
                              (tmp_path / "file" / "n.png", r"file is a file, not a folder")):
        with pytest.raises(SystemExit, match=message):
            _script("neighbors").main([run_id, "--index", str(arrays["indices"][row]), "--out", str(out_path),
                                       "--tracking-uri", uri])
    with pytest.raises(SystemExit, match=r"--index 999 is not an image of run"):  # no --out's folder made for it
        _script("neighbors").main([run_id, "--index", "999", "--out", str(tmp_path / "ex" / "nn" / "n.png"),
                                   "--tracking-uri", uri])
    assert not (tmp_path / "ex").exists()
    short, _ = _script("neighbors").main([run_id[:8].upper(), "--index", str(arrays["indices"][row]), "--k", "4",
                                          "--out", str(tmp_path / "short.png"), "--tracking-uri", uri])
    assert Image.open(short).size == Image.open(out).size  # the short id, in capitals too, names the run
    with pytest.raises(SystemExit, match=r"run 'nope' is not in"):
        _script("neighbors").main(["nope", "--index", "1", "--tracking-uri", uri])


def test_atlas_parquet_has_the_neighbours_and_the_audit_columns(finished, tmp_path):
    """x, y, the k nearest neighbours in the run's geometry (scikit-learn's brute-force cosine search
    as the reference) in Embedding Atlas's {"ids", "distances"} form, and the audit's columns."""
    import pandas as pd
    from sklearn.neighbors import NearestNeighbors

    run_id, uri, arrays, _, classes = finished
    result = _script("export").main(["atlas", run_id, str(tmp_path / "atlas.parquet"), "--tracking-uri", uri,
                                     "--k", "4"])
    frame = pd.read_parquet(tmp_path / "atlas.parquet")
    assert result["rows"] == len(frame) == len(arrays["indices"])
    assert {"x", "y", "neighbors", "label", "cluster_kmeans", "cluster_hdbscan", "duplicate", "outlier_score"} <= set(
        frame.columns)
    np.testing.assert_array_equal(frame[["x", "y"]].to_numpy(), arrays["coords"])
    assert frame["label"].tolist() == [classes[c] for c in arrays["labels"]]
    distances, rows = NearestNeighbors(n_neighbors=5, metric="cosine").fit(arrays["embeddings"]).kneighbors()
    for found, expected, expected_d in zip(frame["neighbors"], rows, distances):
        assert list(found["ids"]) == list(expected[:4])
        np.testing.assert_allclose(found["distances"], expected_d[:4], atol=1e-5)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_embedding_atlas_opens_the_export_in_a_browser(finished, tmp_path):
    """Apple's embedding-atlas serves the file on 127.0.0.1; Chromium loads it: every point counted,
    the audit's columns listed. (Its 2-D view itself needs WebGPU with shader-f16, which this
    headless Chromium's software adapter lacks; the page says so and the data still loads.)"""
    import os
    import shutil
    import signal
    import subprocess
    import time
    import urllib.request

    if shutil.which("embedding-atlas") is None:
        pytest.skip("embedding-atlas is not installed (pip install -e '.[dev]' installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]' installs playwright")
    from test_look import _chromium

    run_id, uri, arrays, _, _ = finished
    path = tmp_path / "atlas.parquet"
    _script("export").main(["atlas", run_id, str(path), "--tracking-uri", uri])
    port = _free_port()
    process = subprocess.Popen(["embedding-atlas", str(path), "--x", "x", "--y", "y", "--neighbors", "neighbors",
                                "--host", "127.0.0.1", "--port", str(port), "--no-auto-port"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            n = len(arrays["indices"])
            page.wait_for_function(f"document.body.innerText.includes('{n} / {n} points')", timeout=60000)
            text = page.inner_text("body")
            assert "cluster_kmeans" in text and "outlier_score" in text and "duplicate" in text
            shot = ROOT / "outputs" / "test-artifacts" / "embedding-atlas.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot))
            browser.close()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
