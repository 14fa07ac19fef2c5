"""scripts/compare.py: is run A better than run B on the same images?"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

from latentmap import logged
from latentmap.runner import run

from helpers import ROOT, compose, mlflow_runs

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on scikit-learn's digits: 16x16 pixels and 2x2 pixels (four shades of grey an image: a
    representation that has lost most of the digit) on the same 200 images, and 16x16 pixels on 120.
    (1x1 pixels, one grey an image, is the same unit row for every image: refused as one point.)"""
    out = tmp_path_factory.mktemp("compare")
    base = ["plots.enabled=false", "metrics.bootstrap=20"]
    ids = {}
    for name, overrides in (("pixels16", ["model=pixels", "model.size=16", "dataset.limit=200"]),
                            ("pixels1", ["model=pixels", "model.size=2", "dataset.limit=200"]),
                            ("pixels16_120", ["model=pixels", "model.size=16", "dataset.limit=120",
                                              "metrics.probe=false"]),
                            ("pixels16_b10", ["model=pixels", "model.size=16", "dataset.limit=200",
                                              "metrics.probe=false", "metrics.bootstrap=10"]),
                            ("pixels16_tsne", ["model=pixels", "model.size=16", "dataset.limit=200",
                                               "reducer=tsne", "metrics.refit_map=false"])):
        reducer = [] if any(o.startswith("reducer=") for o in overrides) else ["reducer=pca"]
        run(compose([*base, *reducer, *overrides], out))
        _, logged = mlflow_runs(out)
        ids[name] = next(r.info.run_id for r in logged if r.info.run_id not in ids.values())
    return out, ids


def _compare(out, a, b, capsys, *extra):
    import compare

    run_id = compare.main([a, b, "--tracking-uri", f"sqlite:///{out}/mlflow.db", *extra])
    return run_id, capsys.readouterr().out


def test_a_run_against_itself_differs_by_exactly_zero(runs, capsys, monkeypatch, tmp_path):
    out, ids = runs
    monkeypatch.chdir(tmp_path)
    run_id, printed = _compare(out, ids["pixels16"], ids["pixels16"], capsys)
    assert "The map metrics" not in printed  # one run's map, handled alike
    client, _ = mlflow_runs(out)
    table = pd.read_csv(client.download_artifacts(run_id, "compare.csv"))
    assert set(table["metric"]) == {"trustworthiness", "continuity", "silhouette_hd", "silhouette_2d",
                                    "knn_acc_hd", "knn_acc_2d", "knn_acc_weighted", "probe_acc", "probe_balanced_acc",
                                    "twonn_id"}
    # equal on every half-sample: no test, no p-value, nothing in Holm's family
    assert (table[["difference", "lo", "hi"]] == 0).all().all() and table["p_value"].isna().all()
    assert table["p_holm"].isna().all() and "p_holm: no metric was tested" in printed
    assert "10 equal in both runs on every half-sample" in printed
    assert (table["n"] == 200).all() and "knn_acc_hd" in printed
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["latentmap.compare.a"] == ids["pixels16"]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/compare.png"}


def test_a_structured_representation_beats_a_degraded_one_with_an_interval_that_excludes_zero(runs, capsys,
                                                                                              monkeypatch, tmp_path):
    out, ids = runs
    monkeypatch.chdir(tmp_path)
    run_id, _ = _compare(out, ids["pixels16"], "params.model.size = '2'", capsys)
    client, _ = mlflow_runs(out)
    table = pd.read_csv(client.download_artifacts(run_id, "compare.csv")).set_index("metric")
    knn = table.loc["knn_acc_hd"]
    assert knn["lo"] > 0.15 and knn["p_value"] < 0.01  # 16x16 digits ~0.95, four shades of grey far lower
    # Holm over the table's metrics: each adjusted p-value is at least its raw one, at most 1, and the
    # smallest is the raw smallest times the number of tests.
    tested = table.dropna(subset=["p_value"])  # TwoNN is undefined for one colour an image: no test
    assert (tested["p_holm"] >= tested["p_value"] - 1e-15).all() and (tested["p_holm"] <= 1).all()
    assert tested["p_holm"].min() == pytest.approx(min(1.0, tested["p_value"].min() * len(tested)))
    # The table's A and B are the runs' own logged metrics; the difference is their difference.
    a, b = client.get_run(ids["pixels16"]).data.metrics, client.get_run(ids["pixels1"]).data.metrics
    for metric, row in table.dropna(subset=["p_value"]).iterrows():
        assert row["a"] == pytest.approx(a[metric], abs=1e-9) and row["b"] == pytest.approx(b[metric], abs=1e-9)
        assert row["difference"] == pytest.approx(a[metric] - b[metric], abs=1e-9)
        assert row["lo"] <= row["difference"] <= row["hi"]
    assert client.get_run(run_id).data.metrics["diff_knn_acc_hd_lo"] == pytest.approx(knn["lo"])


def test_one_embedding_under_two_maps_tests_only_the_map_s_metrics(runs, capsys, monkeypatch, tmp_path):
    """PCA against t-SNE of the same embedding: the embedding's metrics are the same input in both
    runs (no test, as report.html leaves them out); Holm's family is the map's metrics alone."""
    out, ids = runs
    monkeypatch.chdir(tmp_path)
    run_id, printed = _compare(out, ids["pixels16"], ids["pixels16_tsne"], capsys)
    client, _ = mlflow_runs(out)
    table = pd.read_csv(client.download_artifacts(run_id, "compare.csv")).set_index("metric")
    shared = ["silhouette_hd", "knn_acc_hd", "knn_acc_weighted", "probe_acc", "probe_balanced_acc", "twonn_id"]
    assert (table.loc[shared, "difference"] == 0).all() and table.loc[shared, ["p_value", "p_holm"]].isna().all().all()
    tested = table.drop(index=shared)
    assert sorted(tested.index) == ["continuity", "knn_acc_2d", "silhouette_2d", "trustworthiness"]
    assert tested["p_value"].notna().all()
    # Holm over the four: the smallest adjusted p-value is the smallest raw one times four
    assert tested["p_holm"].min() == pytest.approx(min(1.0, tested["p_value"].min() * 4))
    assert "over the 4 metrics tested in this table" in printed and "6 equal in both runs" in printed
    page = Path(client.download_artifacts(run_id, "compare.html")).read_text()
    assert "over the 4 metrics tested in this table" in page and "-0.000" not in page
    # PCA's map was refitted on each half-sample, t-SNE's held fixed (metrics.refit_map=false; the runs'
    # map_refit tags): both
    # the terminal and the page say that the map metrics pair the two.
    tags = [client.get_run(ids[name]).data.tags["map_refit"] for name in ("pixels16", "pixels16_tsne")]
    assert tags == ["true", "false"]
    said = ("The map metrics (trustworthiness, continuity, silhouette_2d, knn_acc_2d) pair A's map refitted on "
            "each half-sample with B's map held fixed, so their intervals carry the refitting of one map at most")
    assert said in printed and said in page.replace("&#x27;", "'")
    # A run made before the tag: its tables/metrics.csv method says the same.
    for name, expected in (("pixels16", "true"), ("pixels16_tsne", "false")):
        values, _ = logged.halves_table(client, ids[name])
        assert logged.map_refit_in(values) == expected == logged.map_refit(client, ids[name])


def test_the_map_note_names_what_it_knows_and_only_the_map_metrics_compared():
    from latentmap import linked

    assert linked.map_handling("true", "true") == linked.map_handling(None, None) == ""
    # Both held fixed (two t-SNE or UMAP runs of more than 2,000 images, by default): the test leaves
    # both fits out, and says so with the calibration's measured rate.
    both = linked.map_handling("false", "false", metrics=["silhouette_2d", "knn_acc_2d", "knn_acc_hd"])
    assert both.startswith("Both maps were held fixed on the half-samples (metrics.refit_map=false")
    assert "(silhouette_2d, knn_acc_2d)" in both and linked.HELD_FIXED_RATE in both
    assert linked.map_handling("false", "false", metrics=["knn_acc_hd"]) == ""
    assert linked.map_handling("true", "false", metrics=["knn_acc_hd", "probe_acc"]) == ""  # no map metric
    said = linked.map_handling("false", None, ("A", "C"), ["silhouette_2d", "knn_acc_hd"])
    assert said.startswith("The map metrics (silhouette_2d) pair A's map held fixed with C's map, whose handling "
                           "its run does not record")


def test_runs_on_different_images_are_refused_in_one_line(runs, capsys, caplog):
    out, ids = runs
    with pytest.raises(SystemExit, match=r"^error: .*scored different images \(200 and 120, 120 indices shared"):
        _compare(out, ids["pixels16"], ids["pixels16_120"], capsys)  # one line, exit 1 (the message is the code)
    with pytest.raises(SystemExit, match=r"^error: .*selects (several|3) runs of latentmap, not one: narrow"):
        _compare(out, ids["pixels16"], "params.model.name = 'pixels'", capsys)  # selects 3 runs, not 1
    with pytest.raises(SystemExit, match="selects 0 runs of latentmap, not one: widen the filter or pass a run id"):
        _compare(out, ids["pixels16"], "params.model.name = 'nosuch'", capsys)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # not logged as well


def test_runs_on_other_half_samples_are_refused_in_one_line(runs, capsys, caplog):
    out, ids = runs
    with pytest.raises(SystemExit, match=r"^error: .*different half-samples \(20 and 10.*metrics\.bootstrap"):
        _compare(out, ids["pixels16"], ids["pixels16_b10"], capsys)


def test_compare_html_shows_every_run_linked_with_the_pairs_numbers(runs, capsys, monkeypatch, tmp_path, caplog):
    """Three runs (16x16 pixels, 1 pixel, 16x16 again): compare.html holds the three maps (the first
    as logged, the others turned onto it), the per-image differences of each against A, each
    pair's paired table (equal to compare's) and its similarity panel (A against itself: CKA 1)."""
    import json
    import re

    import compare
    import numpy as np

    out, ids = runs
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="latentmap")
    run_id = compare.main([ids["pixels16"], ids["pixels1"], ids["pixels16"], "--tracking-uri",
                           f"sqlite:///{out}/mlflow.db"])
    printed = capsys.readouterr().out
    assert "C = " in printed and "A - C:" in printed
    client, _ = mlflow_runs(out)
    page = open(client.download_artifacts(run_id, "compare.html")).read()
    data = json.loads(re.search(r'<script type="application/json" id="lm-data">(.*?)</script>', page, re.S)[1]
                      .replace("<\\/", "</"))
    assert data["n"] == 200 and len(data["sides"]) == 3
    assert "(Procrustes-aligned to A)" in data["sides"][1]["title"] and "aligned" not in data["sides"][0]["title"]
    labels = [c["label"] for c in data["columns"].values()]
    assert "k-NN right or wrong, A vs B" in labels and "k-NN right or wrong, A vs C" in labels
    kept = next(c for c in data["columns"].values() if c["label"].endswith("neighbours kept, A vs C"))
    import base64

    assert (np.frombuffer(base64.b64decode(kept["data"]), np.float32) == 1).all()  # C is A: every neighbour kept
    table = pd.read_csv(client.download_artifacts(run_id, "compare.csv")).set_index("metric")
    (pair_ab,) = re.findall(r"<table class='lm-differences' data-pair='AB'>.*?</table>", page, re.S)
    shown = dict(re.findall(r'<tr data-metric="(\w+)">(?:<td[^>]*>[^<]*</td>){3}<td data-value="([^"]+)"', pair_ab))
    assert set(shown) == set(table.index)
    for metric, value in shown.items():
        assert float(value) == pytest.approx(table.loc[metric, "difference"], abs=1e-12, nan_ok=True)
    same = re.findall(r"<table class='lm-panel' data-pair='AC'>.*?</table>", page, re.S)[0]
    assert re.search(r'data-measure="cka"><td class="name">cka</td><td>1\.000', same)
    assert {a.path for a in client.list_artifacts(run_id)} >= {"compare.csv", "compare_A_C.csv", "compare.html"}
    copy = tmp_path / "outputs" / "compare" / run_id  # the local copy, under the folder it ran in, named
    assert (copy / "compare.html").read_text() == page and f"are also in {copy.resolve()}" in caplog.text
    # a forest plot for every pair, not only A - B
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/compare.png", "plots/compare_A_C.png"}
    # every pair's differences in MLflow (A - C was only in its CSV): diff_<metric> A - B, diff_C_<metric> A - C
    logged = client.get_run(run_id).data.metrics
    with_c = pd.read_csv(client.download_artifacts(run_id, "compare_A_C.csv")).set_index("metric")
    for metric in table.index:
        assert logged[f"diff_{metric}"] == pytest.approx(table.loc[metric, "difference"], nan_ok=True)
        assert logged[f"diff_C_{metric}_hi"] == pytest.approx(with_c.loc[metric, "hi"], nan_ok=True)
    with pytest.raises(SystemExit):
        compare.main([ids["pixels16"], "--tracking-uri", f"sqlite:///{out}/mlflow.db"])
    # a folder where outputs/compare cannot be made: one line before any run (a traceback, a FAILED run)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "outputs").write_text("a file")
    monkeypatch.chdir(blocked)
    before = len(client.search_runs([client.get_run(run_id).info.experiment_id]))
    with pytest.raises(SystemExit, match=r"^error: --output-dir outputs/compare cannot be written \(.*outputs is "
                                         r"not a folder\): choose a writable folder$"):
        compare.main([ids["pixels16"], ids["pixels1"], "--tracking-uri", f"sqlite:///{out}/mlflow.db"])
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == before
    elsewhere = compare.main([ids["pixels16"], ids["pixels1"], "--tracking-uri", f"sqlite:///{out}/mlflow.db",
                              "--output-dir", str(tmp_path / "elsewhere")])  # the copy where asked
    assert (tmp_path / "elsewhere" / elsewhere / "compare.html").is_file()


def test_a_run_is_named_by_the_short_id_pages_show(runs, monkeypatch):
    """compare.py's run name, map titles and tables show 8 characters of an id: those (6 or more)
    select the run; a prefix of several runs' ids, or of none, is one line naming the fix."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from latentmap import logged
    from latentmap.commands import compare
    from latentmap.errors import ConfigError

    out, ids = runs
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    for run_id in ids.values():
        assert compare.resolve_run(client, run_id[:8], "latentmap") == run_id
        assert compare.resolve_run(client, run_id, "latentmap") == run_id
        assert compare.resolve_run(client, run_id.upper(), "latentmap") == run_id  # was read as a filter
        assert logged.run_id_of(client, run_id[:8]) == run_id  # report.py, export.py, neighbors.py: the store's
    # export.py and neighbors.py read a run by the short id too (it was "not in" the store that held it)
    first = next(iter(ids.values()))
    assert logged.load(first[:8], f"sqlite:///{out}/mlflow.db").run_id == first
    every = [r.info.run_id for r in logged.all_runs(client, client.get_experiment_by_name("latentmap").experiment_id)]
    assert set(ids.values()) <= set(every) and len(every) == len(set(every))
    unused = next(p for p in (f"{i:06x}" for i in range(1 << 24)) if not any(r.startswith(p) for r in every))
    with pytest.raises(ConfigError, match=f"^no run id of experiment 'latentmap' begins '{unused}': pass the whole "
                                          "id, --experiment for the experiment that holds it"):
        compare.resolve_run(client, unused, "latentmap")
    with pytest.raises(ConfigError, match=f"^no run id in sqlite:///.* begins '{unused}': pass the whole id, or "
                                          "--tracking-uri"):
        logged.run_id_of(client, unused)
    twins = [SimpleNamespace(info=SimpleNamespace(run_id="abcdef" + tail * 26)) for tail in "01"]
    monkeypatch.setattr(logged, "all_runs", lambda client, experiment: iter(twins))
    with pytest.raises(ConfigError, match=r"^'abcdef' begins 2 run ids of experiment 'latentmap': pass more of"):
        compare.resolve_run(client, "abcdef", "latentmap")
    assert compare.resolve_run(client, "abcdef1", "latentmap") == "abcdef" + "1" * 26


def test_a_run_stopped_after_logging_its_tables_is_refused_up_front(runs, capsys, caplog, tmp_path):
    """A run Ctrl-C stopped while drawing its plots had already logged tables/per_image.csv, and
    compare.py compared it as if it had finished. Its status is checked first now."""
    out, ids = runs
    client, _ = mlflow_runs(out)
    source = client.get_run(ids["pixels16"])
    stopped = client.create_run(source.info.experiment_id, run_name="stopped while plotting")
    tables = client.download_artifacts(ids["pixels16"], "tables", str(tmp_path))
    client.log_artifacts(stopped.info.run_id, tables, "tables")
    client.set_terminated(stopped.info.run_id, status="KILLED")
    with pytest.raises(SystemExit, match=f"^error: run {stopped.info.run_id} is KILLED: pass a finished run"):
        _compare(out, ids["pixels16"], stopped.info.run_id, capsys)
