"""latentmap.study_report: what a study's report page and its linked page show (the summary read
from a real sweep: test_studies.py; the report command: test_readme.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from latentmap import studies, study_report


def test_the_linked_page_shows_a_layer_study_s_first_middle_and_last_block_of_one_setting():
    """Up to six runs: all of them. A layer study of more: the first, middle and last block of the
    first run's other settings (one model, one reducer), whatever the table's order. Another study
    of more: the first six."""
    few = pd.DataFrame({"varied.layer": ["0", "1", "2"]})
    assert study_report.linked_runs(few, ["layer"]) == [0, 1, 2]
    rows = [{"varied.layer": str(layer), "varied.reducer": reducer} for reducer in ("umap", "pca")
            for layer in (4, 0, 3, 1, 2)]  # blocks out of order
    table = pd.DataFrame(rows)
    shown = study_report.linked_runs(table, ["layer", "reducer"])
    assert [table.loc[i, "varied.layer"] for i in shown] == ["0", "2", "4"]
    assert {table.loc[i, "varied.reducer"] for i in shown} == {"umap"}
    other = pd.DataFrame({"varied.model": [f"m{i}" for i in range(9)]})
    assert study_report.linked_runs(other, ["model"]) == list(range(6))


def test_each_child_gets_its_own_map_thumbnail_in_the_report(tmp_path):
    """Every child's plots/scatter.png has the same name: the report must still show each run's own."""
    import re

    from PIL import Image

    colours = {"run-a": (200, 30, 30), "run-b": (30, 30, 200)}

    class Client:
        def get_run(self, run_id):
            from types import SimpleNamespace

            return SimpleNamespace(info=SimpleNamespace(experiment_id="1", run_name="sweep"))

        def get_experiment(self, experiment_id):
            from types import SimpleNamespace

            return SimpleNamespace(name="latentmap")

        def download_artifacts(self, run_id, path, dst):
            target = Path(dst) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (300, 200), colours[run_id]).save(target)
            return str(target)

    table = pd.DataFrame({"run_id": list(colours), "run_name": ["a", "b"], "group": ["", ""],
                          "layer_index": [0, 1], "reducer": ["PCA", "PCA"], "knn_acc_hd": [0.5, 0.6]})
    (tmp_path / "plots").mkdir()
    page = study_report.write_report(Client(), "parent", studies.Summary(table=table), tmp_path).read_text()
    thumbs = re.findall(r'<img alt="map of (\w)" src="([^"]+)"', page)
    assert [name for name, _ in thumbs] == ["a", "b"] and thumbs[0][1] != thumbs[1][1]


class _ReportClient:
    """What write_report reads of MLflow: the run's name, experiment 3 and its name; no plots."""

    tracking_uri = "sqlite:///x.db"

    def __init__(self, run_name: str, experiment: str) -> None:
        self.run_name, self.experiment = run_name, experiment

    def get_run(self, run_id):
        from types import SimpleNamespace

        return SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_name=self.run_name))

    def get_experiment(self, experiment_id):
        from types import SimpleNamespace

        return SimpleNamespace(name=self.experiment)

    def download_artifacts(self, run_id, path, folder):
        raise OSError("no plots")


def test_the_report_names_its_experiment_and_the_runs_that_did_not_finish(tmp_path):
    """A sweep with a failed job: report.html says which runs it leaves out (it spoke of the finished
    ones only, as if the sweep had been smaller), names the experiment, and counts in good English."""

    from latentmap.studies import Summary

    table = pd.DataFrame({"run_id": ["a" * 32], "run_name": ["layer=0"], "varied.layer": ["0"],
                          "knn_acc_hd": [0.9], "knn_acc_hd_lo": [0.85], "knn_acc_hd_hi": [0.94]})
    summary = Summary(table=table, varied=["layer"])
    page = study_report.write_report(_ReportClient("layer · sweep 10-00-00", "vit-layers"), "p" * 32, summary,
                                     tmp_path, ["layer=99 (FAILED)"]).read_text()
    assert "1 finished run of experiment &#x27;vit-layers&#x27; (3)" in page
    assert "Not in this page: 1 run that did not finish: layer=99 (FAILED)." in page


def test_a_group_key_one_run_set_and_others_left_at_the_default_varies(tmp_path):
    """Two UMAP runs, one with reducer.n_neighbors=40 set on its command line and one at the default
    (15, which its config.yaml holds but its params do not), beside a PCA run with audit.enabled=false
    set. Unfilled, the UMAP runs read as 40 against missing, so n_neighbors did not vary among the
    runs of one option and the report's "what varied" left it out. Filled in from each run's
    config, it varies; a run without a config.yaml keeps its keys missing."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    configs = [("umap", {"reducer.n_neighbors": "40"}, "reducer:\n  n_neighbors: 40\naudit:\n  enabled: true\n"),
               ("umap", {}, "reducer:\n  n_neighbors: 15\naudit:\n  enabled: true\n"),
               ("pca", {"audit.enabled": "False"}, "reducer:\n  n_components: 2\naudit:\n  enabled: false\n"),
               ("umap", {}, None)]  # no config.yaml
    for reducer, params, config in configs:
        run = client.create_run(experiment)
        for key, value in {"choice.reducer": reducer, "choice.audit": "default", "seed": "0", **params}.items():
            client.log_param(run.info.run_id, key, value)
        if config:
            client.log_text(run.info.run_id, config, "config.yaml")
        client.set_terminated(run.info.run_id)
    mlflow.set_tracking_uri(client.tracking_uri)
    runs = mlflow.search_runs([experiment]).sort_values("start_time").reset_index(drop=True)
    assert studies.varied_keys(runs) == ["params.audit.enabled", "params.choice.reducer"]  # n_neighbors lost
    filled = study_report.with_group_defaults(client, runs)
    assert filled["params.reducer.n_neighbors"].tolist()[:2] == ["40", "15"]
    assert pd.isna(filled.loc[2, "params.reducer.n_neighbors"])  # PCA has none
    assert filled["params.audit.enabled"].tolist()[:3] == ["True", "True", "False"]
    assert filled.iloc[3][["params.reducer.n_neighbors", "params.audit.enabled"]].isna().all()
    assert studies.varied_keys(filled) == ["params.audit.enabled", "params.choice.reducer",
                                           "params.reducer.n_neighbors"]
    table = studies.runs_table(filled.iloc[:3])
    assert sorted(table["varied.reducer.n_neighbors"].dropna()) == ["15", "40"]


def test_the_linked_page_pairs_from_a_run_scored_on_half_samples(tmp_path):
    """compare.html pairs run A with every other run: a filter whose first run was made with
    metrics.bootstrap=0 (no half-samples) left every pair empty though the others pair. A is the
    first run that has half-samples; the order is otherwise kept."""
    asked = []

    class Client:
        def download_artifacts(self, run_id, path, dst):
            asked.append(run_id)
            raise OSError("stop here: the run A chosen is what this test reads")

    table = pd.DataFrame({"run_id": ["r0", "r1", "r2"], "varied.model": ["a", "b", "c"],
                          "halves_digest": [None, "h", "h"]})
    assert study_report.linked_page(Client(), table, ["model"], tmp_path) is None
    assert asked == ["r1"]
    asked.clear()
    study_report.linked_page(Client(), table.assign(halves_digest="h"), ["model"], tmp_path)
    assert asked == ["r0"]


def test_a_sweep_s_deleted_child_is_named_on_its_report(tmp_path):
    """A child deleted in MLflow's UI left a blank cell in the report's grid of maps, unexplained: the
    children read for a report include it as DELETED, which the page names beside the jobs that did
    not finish."""

    from mlflow.tracking import MlflowClient

    from latentmap.studies import Summary

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e")
    parent = client.create_run(experiment).info.run_id
    kept, gone = (client.create_run(experiment, tags={"mlflow.parentRunId": parent, "mlflow.runName": name}).info.run_id
                  for name in ("kept", "gone"))
    for run in (kept, gone):
        client.set_terminated(run, "FINISHED")
    client.delete_run(gone)
    children = study_report.child_runs(client, parent)
    assert dict(zip(children["run_id"], children["status"])) == {kept: "FINISHED", gone: "DELETED"}

    table = pd.DataFrame({"run_id": [kept], "run_name": ["kept"], "varied.layer": ["0"], "knn_acc_hd": [0.9]})
    page = study_report.write_report(_ReportClient("sweep", "e"), parent, Summary(table=table, varied=["layer"]),
                                     tmp_path, ["gone (DELETED)"]).read_text()
    assert "Not in this page: 1 run that was deleted: gone (DELETED)." in page
