"""Against a real MLflow tracking server on 127.0.0.1 (conftest's ``mlflow_server``): a sweep, then a
server that is down. (Parallel jobs
against one store are tested on SQLite, the harder case, in test_sweep.py.)"""

from __future__ import annotations

import pytest

from helpers import free_port, run_script, sweep_runs


def test_sweep_against_a_server_then_a_server_down(mlflow_server, class_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = mlflow_server
    code, err = run_script(["run.py", "-m", "model=pixels", "reducer=pca", "dataset=imagefolder",  # python run.py -m
                            f"dataset.path={class_folder}", "plots.enabled=false", "metrics.probe=false",
                            f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", "metrics.k=3,4"], tmp_path)
    assert code == 0, err[-3000:]
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("latentmap")
    runs = client.search_runs([experiment.experiment_id])
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" and c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for c in children)
    assert {a.path for a in client.list_artifacts(children[0].info.run_id, "arrays")} >= {
        "arrays/embeddings.npy", "arrays/coords.npy", "arrays/outlier_score.npy"}

    # A server that is down, as the client meets it: nothing listens on its port (the shared server
    # serves other tests, so it stays up).
    down_uri = f"http://127.0.0.1:{free_port()}"
    from latentmap.errors import ConfigError
    from latentmap.runner import run

    from helpers import compose

    down = compose(["model=pixels", "reducer=pca", "dataset=imagefolder", f"dataset.path={class_folder}",
                    "plots.enabled=false", f"tracking.uri={down_uri}"], tmp_path / "down")
    with pytest.raises(ConfigError, match=rf"^tracking.uri={down_uri} is unreachable .*start the server"):
        run(down)  # run.py prints this one line and exits 1 (test_runner checks that path)
    assert not (tmp_path / "down" / "cache").exists()  # failed before any extraction
