"""Against a real MLflow tracking server on 127.0.0.1: a sweep, then the server down. (Parallel jobs
against one store are tested on SQLite, the harder case, in test_sweep.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import run_script, sweep_runs


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on 127.0.0.1 and a free port (SQLite backend, one worker); stopped by PID."""
    port = _free_port()
    store = tmp_path / "server"
    store.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=(store / "log").open("w"), start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError as error:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(store / 'log').read_text()[-2000:]}") from error
                time.sleep(0.5)
        yield uri, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_sweep_against_a_server_then_the_server_down(mlflow_server, class_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, process = mlflow_server
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

    os.killpg(process.pid, signal.SIGTERM)  # the server goes down
    process.wait(timeout=30)
    from latentmap.errors import ConfigError
    from latentmap.runner import run

    from helpers import compose

    down = compose(["model=pixels", "reducer=pca", "dataset=imagefolder", f"dataset.path={class_folder}",
                    "plots.enabled=false", f"tracking.uri={uri}"], tmp_path / "down")
    with pytest.raises(ConfigError, match=rf"^tracking.uri={uri} is unreachable .*start the server"):
        run(down)  # run.py prints this one line and exits 1 (test_runner checks that path)
    assert not (tmp_path / "down" / "cache").exists()  # failed before any extraction
