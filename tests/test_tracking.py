"""The MLflow edge, module by module: the store and its retries, redaction, the resume hash, the run
lifecycle, stale-run clean-up and the sweep's failure markers; and its boundary (no study code)."""

from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from latentmap import tracking

from helpers import ROOT, compose


class _FlakyStore:
    """A stand-in MLflow client whose call fails ``failures`` times with ``message``, then answers."""

    def __init__(self, failures: int, message: str):
        self.failures, self.message, self.calls = failures, message, 0
        self.tracking_uri = "sqlite:///fake.db"

    def get_run(self, run_id):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)
        return f"run {run_id}"


def test_retrying_client_retries_a_locked_database_then_answers(caplog):
    store = _FlakyStore(3, "(sqlite3.OperationalError) database is locked")
    client = tracking.RetryingClient(store, attempts=5, first_wait=0.001)
    assert client.get_run("abc") == "run abc" and store.calls == 4
    assert len([r for r in caplog.records if "MLflow store busy" in r.getMessage()]) == 3
    assert client.tracking_uri == "sqlite:///fake.db"  # attributes pass through unchanged


def test_retrying_client_gives_up_after_its_attempts_and_never_retries_other_errors():
    store = _FlakyStore(10, "database is locked")
    with pytest.raises(RuntimeError, match="database is locked"):
        tracking.RetryingClient(store, attempts=3, first_wait=0.001).get_run("abc")
    assert store.calls == 3
    other = _FlakyStore(1, "RESOURCE_DOES_NOT_EXIST: run abc")
    with pytest.raises(RuntimeError, match="RESOURCE_DOES_NOT_EXIST"):
        tracking.RetryingClient(other, attempts=5, first_wait=0.001).get_run("abc")
    assert other.calls == 1


def test_tracking_uri_makes_a_relative_sqlite_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri("sqlite:///outputs/mlflow.db") == f"sqlite:///{tmp_path}/outputs/mlflow.db"
    assert (tmp_path / "outputs").is_dir()
    assert tracking.tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_a_store_path_that_cannot_be_a_database_is_one_line(tmp_path):
    """A SQLite store whose folder cannot be made (under a file, or not permitted) or whose path is a
    folder: one line naming the key (each was a traceback). A command that reads runs refuses a store
    that does not exist instead of making an empty one."""
    from latentmap.errors import ConfigError

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"tracking.uri='sqlite:///.*/file/x.db': its folder .*/file cannot be made "
                                          r"\(.*\): choose a writable place, e.g. tracking.uri=sqlite:///outputs/"):
        tracking.tracking_uri(f"sqlite:///{tmp_path}/file/x.db")
    with pytest.raises(ConfigError, match=r"names a folder, not a database file: e.g. tracking.uri=sqlite:///.*/mlflow"):
        tracking.tracking_uri(f"sqlite:///{tmp_path}")
    with pytest.raises(ConfigError, match=r"--tracking-uri='sqlite:///.*/none/x.db': there is no MLflow store at "):
        tracking.existing_store(f"sqlite:///{tmp_path}/none/x.db")
    assert not (tmp_path / "none").exists()
    (tmp_path / "runs.db").write_bytes(b"")
    assert tracking.existing_store(f"sqlite:///{tmp_path}/runs.db") == f"sqlite:///{tmp_path}/runs.db"
    assert tracking.existing_store(f"sqlite:///{tmp_path}/runs.db?timeout=30").endswith("runs.db?timeout=30")
    # a server that does not answer, or a folder: one line, not minutes of MLflow's retries or its traceback
    with pytest.raises(ConfigError, match=r"^--tracking-uri=http://127.0.0.1:9 is unreachable \(.*\): start the "):
        tracking.existing_store("http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"^--tracking-uri='\./mlruns' is a folder, and MLflow 3 no longer writes"):
        tracking.existing_store("./mlruns")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a folder no one can write")
def test_a_store_that_cannot_be_written_is_one_line_before_any_work(tmp_path):
    """A store in a folder that cannot be written waited 10 minutes on its lock file (/proc), or failed
    in MLflow with a traceback (a read-only folder or file). A command that only reads runs
    (export, neighbours) still reads one."""
    from latentmap.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^tracking.uri='sqlite:////proc/mlflow.db': the store /proc/mlflow.db "
                                          r"cannot be written \(.*\): choose a writable place"):
        tracking.tracking_uri("sqlite:////proc/mlflow.db")
    readable = "sqlite:////proc/self/status"  # a file that exists and cannot be written
    with pytest.raises(ConfigError, match=r"^--tracking-uri='sqlite:////proc/self/status': the store .* cannot be"):
        tracking.existing_store(readable)
    assert tracking.existing_store(readable, writes=False) == readable


def test_an_unreachable_server_is_one_line():
    from latentmap.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tracking.uri=http://127.0.0.1:9 is unreachable .*start the server"):
        tracking.check_reachable("http://127.0.0.1:9", timeout=2)
    tracking.check_reachable("sqlite:///anything.db")  # not a server: nothing to check


def test_redact_replaces_secret_keys_and_values_from_the_environment():
    resolved = {"model": {"name": "vit", "api_key": "abc"}, "hf_token": "tok", "note": "hunter2",
                "layers": [1, 2], "password_policy": {"length": 8}, "token": None}
    raw = {"model": {"name": "vit", "api_key": "abc"}, "hf_token": "tok", "note": "${oc.env:SECRET}",
           "layers": [1, 2], "password_policy": {"length": 8}, "token": None}
    assert tracking.redact(resolved, raw) == {
        "model": {"name": "vit", "api_key": "***"}, "hf_token": "***", "note": "***", "layers": [1, 2],
        "password_policy": {"length": 8}, "token": None}
    hydra_files = "hf_token: tok-1\n  - +hf_token=tok-1\n  - model.api_key=abc\nlayer: -1\nname: vit"
    assert tracking.redact_yaml_text(hydra_files) == (
        "hf_token: ***\n  - +hf_token=***\n  - model.api_key=***\nlayer: -1\nname: vit")


def test_config_hash_ignores_only_the_keys_that_do_not_change_results(tmp_path):
    base = compose(["model=pixels"], tmp_path)
    digest = tracking.config_hash(base)
    for same in (["device=cpu"], ["batch_size=7"], ["num_workers=2"], ["reuse_freed_memory=false"], ["tracking=none"],
                 [f"cache_dir={tmp_path}/c"]):
        assert tracking.config_hash(compose(["model=pixels", *same], tmp_path)) == digest, same
    # a run logged before reuse_freed_memory existed: the same hash, so resume=true still finds it
    assert tracking.config_hash(compose(["model=pixels", "~reuse_freed_memory"], tmp_path)) == digest
    for other in (["seed=1"], ["reducer=pca"], ["metrics.k=5"], ["model.size=16"], ["layer=0"]):
        assert tracking.config_hash(compose(["model=pixels", *other], tmp_path)) != digest, other
    assert tracking.config_hash(compose(["model=pixels", "device=cpu"], tmp_path / "elsewhere")) == digest


def test_flatten_joins_keys_with_dots():
    assert tracking.flatten({"model": {"name": "x", "size": 3}, "layers": [1, 2], "seed": 4}) == {
        "model.name": "x", "model.size": "3", "layers": "[1, 2]", "seed": "4"}


def _client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.tracking_uri(f"sqlite:///{tmp_path}/mlflow.db"))


def test_cleanup_marks_killed_only_the_dead_processes_of_this_host(tmp_path):
    import contextlib
    import io
    import socket
    import subprocess
    import sys

    client = _client(tmp_path)
    experiment = client.create_experiment("e")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = client.create_run(experiment, tags={"host": host, "pid": str(gone.pid)}).info.run_id
    alive = client.create_run(experiment, tags={"host": host, "pid": str(os.getpid())}).info.run_id
    remote = client.create_run(experiment, tags={"host": "another-node", "pid": "1"}).info.run_id
    assert tracking.cleanup_stale_runs(client, [experiment]) == [dead]
    assert [client.get_run(r).info.status for r in (dead, alive, remote)] == ["KILLED", "RUNNING", "RUNNING"]
    unknown = client.create_run(experiment).info.run_id  # no host, no pid recorded
    no_pid = client.create_run(experiment, tags={"host": host}).info.run_id  # this host, no process to check
    # runs.py cleanup says what it could not check, and how to mark it (it said "marked 0 run(s) KILLED" alone)
    from latentmap.commands import runs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert runs.main(["cleanup", "--tracking-uri", uri, "--experiment", "e"]) == []
    assert said.getvalue().splitlines() == [
        "marked 0 run(s) KILLED", f"left 3 RUNNING run(s) it cannot check from {host} "
        f"({', '.join(sorted(['another-node', 'no host recorded', host]))}): they may still be running there; "
        "`--all-hosts` marks them KILLED"]
    assert sorted(tracking.cleanup_stale_runs(client, [experiment], all_hosts=True)) == sorted([remote, unknown,
                                                                                               no_pid])
    assert client.get_run(unknown).data.tags["latentmap.cleanup"].endswith("(recorded host unknown, pid unknown)")


def test_an_artifact_location_that_cannot_be_written_is_one_line_and_no_run_left_running(tmp_path):
    """tracking.artifact_location=/proc/x (or a file) made an experiment whose every run stayed
    RUNNING behind chained tracebacks: the location is refused before an experiment is made with
    it; an experiment whose folder cannot be written any more ends its run FAILED with the line."""
    from latentmap.errors import ConfigError

    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    cfg = compose(["model=pixels", "tracking.experiment=first", f"tracking.artifact_location={taken}"], tmp_path)
    with pytest.raises(ConfigError, match=rf"^tracking.artifact_location='{taken}' cannot be written \(File exists\): "
                                          r"choose a writable folder"):
        with tracking.start_run(cfg, tmp_path / "a"):
            pass
    client = _client(tmp_path)
    assert client.get_experiment_by_name("first") is None
    folder = tmp_path / "artifacts"
    cfg = compose(["model=pixels", "tracking.experiment=second", f"tracking.artifact_location={folder}"], tmp_path)
    with tracking.start_run(cfg, tmp_path / "b"):
        pass
    shutil.rmtree(folder)
    folder.write_text("the folder is now a file")
    with pytest.raises(ConfigError, match=r"^the run's artifact folder .* cannot be written \(Not a directory\); "
                                          r"it is the experiment's artifact folder: choose a writable "
                                          r"tracking.artifact_location"):
        with tracking.start_run(cfg, tmp_path / "c"):
            pass
    runs = client.search_runs([client.get_experiment_by_name("second").experiment_id], order_by=["start_time"])
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    assert runs[1].data.tags["error"].startswith("ConfigError: the run's artifact folder")


def test_an_existing_experiment_s_other_artifact_folder_is_said_not_ignored(tmp_path, caplog):
    """MLflow keeps the artifact folder an experiment was made with: asking for another one for the
    same experiment is said in one WARNING line naming both folders; the same folder says nothing."""
    import logging

    from omegaconf import OmegaConf

    from latentmap.tracking import store

    made, other = tmp_path / "made", tmp_path / "other"
    cfg = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e", "artifact_location": str(made)}
    with caplog.at_level(logging.WARNING, logger="latentmap.tracking.store"):
        client, experiment = store.connect(OmegaConf.create(cfg))
        store.connect(OmegaConf.create(cfg))
        assert not caplog.records
        store.connect(OmegaConf.create({**cfg, "artifact_location": f"{tmp_path}/made/../made"}))
        assert not caplog.records  # one folder, written two ways
        store.connect(OmegaConf.create({**cfg, "artifact_location": str(other)}))
    assert Path(client.get_experiment(experiment).artifact_location.removeprefix("file://")) == made
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"tracking.artifact_location={other} is not where this run's artifacts go: experiment 'e' "
                           f"was made with {made}") and "tracking.experiment=<name>" in line, line


def test_start_run_records_params_tags_artifacts_and_its_status(tmp_path):
    cfg = compose(["model=pixels", "+hf_token=tok"], tmp_path)
    with tracking.start_run(cfg, tmp_path / "a") as tracker:
        tracker.log_metrics({"m": 0.5})
        tracker.save_arrays({"values": np.arange(3)})
    with pytest.raises(ZeroDivisionError):
        with tracking.start_run(cfg, tmp_path / "b"):
            1 / 0  # noqa: B018 - the expression raises: a run that fails
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run(cfg, tmp_path / "c"):
            raise KeyboardInterrupt
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("latentmap").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED", "KILLED"]
    finished = next(r for r in runs if r.info.status == "FINISHED")
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert finished.data.metrics == {"m": 0.5} and finished.data.params["hf_token"] == "***"
    assert finished.data.params["model.name"] == "pixels" and finished.data.tags["pid"] == str(os.getpid())
    assert finished.data.tags["latentmap.config_hash"] == tracking.config_hash(cfg)
    files = {a.path for a in client.list_artifacts(finished.info.run_id, "arrays")}
    assert files == {"arrays/values.npy"}
    assert failed.data.tags["error"] == "ZeroDivisionError: division by zero"
    error_txt = Path(client.download_artifacts(failed.info.run_id, "error.txt")).read_text()
    assert "Traceback" in error_txt and "1 / 0" in error_txt


def test_failed_job_markers_round_trip_in_job_order(tmp_path):
    assert tracking.failed_jobs(tmp_path) == []
    tracking.mark_job_failed(tmp_path, 10, "ConfigError: b")
    tracking.mark_job_failed(tmp_path, 2, "ConfigError: a")
    assert tracking.failed_jobs(tmp_path) == ["#2: ConfigError: a", "#10: ConfigError: b"]


def _imports(path: Path) -> set[str]:
    """Every module a source file imports (absolute names), at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_mlflow_edge_imports_no_study_model_or_plot_code():
    package = ROOT / "src" / "latentmap"
    forbidden = ("latentmap.studies", "latentmap.measures", "latentmap.plots", "latentmap.figures",
                 "latentmap.models", "latentmap.runner", "latentmap.finetune")
    for path in (package / "tracking").glob("*.py"):
        bad = {name for name in _imports(path) if name.startswith(forbidden)}
        assert not bad, f"{path.name} imports {bad}"


def test_no_module_imports_the_runner():
    """runner.py is the top of the house: run.py calls it (through the config's `task`) and the bench
    times it; no module of the package imports it."""
    importers = [p.name for p in (ROOT / "src").rglob("*.py") if any(n.startswith("latentmap.runner")
                                                                     for n in _imports(p))]
    assert importers == []


def test_a_dataset_input_logged_by_two_jobs_at_once_is_retried_not_fatal(tmp_path, caplog):
    """Parallel jobs registering the same dataset race on MLflow's unique key: the loser retries (and
    then only links the dataset); any other failure to log the input is a warning, not a failed run."""
    from mlflow.exceptions import MlflowException

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def log_inputs(self, run_id, datasets):
            self.calls += 1
            if self.errors:
                raise MlflowException(self.errors.pop(0))

    raced = Client(["(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id"])
    tracking.Tracker(tmp_path, raced, "run").log_dataset("digits", "abc", {}, {"images": 3})
    assert raced.calls == 2
    broken = Client(["the store is read-only"])
    tracking.Tracker(tmp_path, broken, "run").log_dataset("digits", "abc", {}, {"images": 3})
    assert broken.calls == 1 and "could not log the dataset input to MLflow: the store is read-only" in caplog.text


@pytest.mark.parametrize("swept,overrides,expected", [
    ("reducer,model", {"reducer": "umap", "model": "vit"}, "umap · vit · embed"),
    ("reducer.n_neighbors", {"reducer.n_neighbors": "5"}, "reducer.n_neighbors=5 · vit-base · embed · UMAP"),
    ("model.name", {"model.name": "org/vit-base"}, "vit-base · embed · UMAP"),
    ("layer,reducer", {"layer": "3", "reducer": "umap"}, "layer 3 · umap · vit-base · cls"),
])
def test_a_sweeps_runs_are_named_by_what_it_varies_first(monkeypatch, swept, overrides, expected):
    """MLflow's Run Name column shows about 25 characters: each sweep's runs differ there."""
    from omegaconf import OmegaConf

    from latentmap.tracking import run as tracked

    monkeypatch.setenv(tracked.SWEPT_ENV, swept)
    monkeypatch.setattr(tracked, "_job_overrides", lambda: overrides)
    monkeypatch.setattr(tracked, "_choice_params", lambda: {"model": "vit", "reducer": "umap"})
    layered = "layer" in overrides
    parts = {"model": "vit-base", **({"layer": "layer 3"} if layered else {}), "pool": "cls" if layered else "embed",
             "reducer": "UMAP"}
    assert tracked.run_name(OmegaConf.create({"tracking": {}}), parts) == expected


def _schema(path: Path) -> tuple[list, list]:
    import sqlite3

    with sqlite3.connect(path) as db:
        tables = sorted(db.execute("select type, name, sql from sqlite_master where name not like 'sqlite_%'"))
        version = db.execute("select version_num from alembic_version").fetchall()
    db.close()
    return tables, version


def test_a_new_sqlite_store_starts_from_the_machine_s_empty_store_with_mlflow_s_schema(tmp_path, monkeypatch):
    """The first new store of a machine is built by MLflow and kept as the template; the next one is
    a copy of it: the same tables, indexes and migration version as a store MLflow built, and MLflow
    opens and writes it. A cache folder that cannot be written leaves every store to MLflow."""
    import sqlalchemy
    from mlflow.store.db.utils import _verify_schema
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from latentmap.tracking import store

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = {"experiment": "latentmap"}
    store.connect(OmegaConf.create({**cfg, "uri": f"sqlite:///{tmp_path}/built/mlflow.db"}))
    template = store._schema_template()
    assert template.is_file() and template.parent == tmp_path / "cache" / "latentmap"
    assert _schema(template) == _schema(tmp_path / "built" / "mlflow.db")
    elsewhere = tmp_path / "elsewhere"  # another working folder: MLflow's default artifact root moves with it
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client, experiment = store.connect(OmegaConf.create({**cfg, "uri": f"sqlite:///{tmp_path}/copied/mlflow.db"}))
    copied = tmp_path / "copied" / "mlflow.db"
    assert _schema(copied) == _schema(tmp_path / "built" / "mlflow.db")
    _verify_schema(sqlalchemy.create_engine(f"sqlite:///{copied}"))  # MLflow's own check of a store it opens
    umask = os.umask(0)
    os.umask(umask)
    assert copied.stat().st_mode & 0o777 == 0o666 & ~umask
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "knn_acc_hd", 0.5)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics == {"knn_acc_hd": 0.5}
    assert {e.name for e in client.search_experiments()} == {"latentmap", "Default"}
    # MLflow made this store's own Default experiment (the first store's would point into its folder)
    first = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/built/mlflow.db").get_experiment("0").artifact_location
    assert str(elsewhere) in client.get_experiment("0").artifact_location and str(elsewhere) not in first
    assert not list((tmp_path / "copied").glob("*.tmp"))  # no staging file left

    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    client, experiment = store.connect(OmegaConf.create({**cfg, "uri": f"sqlite:///{tmp_path}/alone/mlflow.db"}))
    assert client.get_experiment(experiment).name == "latentmap"


def test_the_printed_mlflow_ui_command_pastes_as_it_is_for_a_store_path_with_spaces(tmp_path):
    """The last line of a run says how to open it; a store under a folder with a space printed a
    command the shell split in two. The path in it is quoted where it must be, and only there."""
    import shlex
    from types import SimpleNamespace

    from latentmap.tracking.run import ui_link

    for uri in (f"sqlite:///{tmp_path}/my dir/ml flow.db", "sqlite:///outputs/mlflow.db"):
        line = ui_link(SimpleNamespace(tracking_uri=uri), "1", "abc")
        command = line.split("`")[1]
        assert shlex.split(command) == ["mlflow", "ui", "--backend-store-uri", uri], command
    assert "`mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`" in line  # nothing quoted that needs none
