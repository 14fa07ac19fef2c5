"""The tracked-task wrapper every entry point uses, and the Hydra mains' error handling."""

from __future__ import annotations

import logging

import pytest

from latentmap import task, tracking
from latentmap.errors import ConfigError

from helpers import compose, mlflow_runs


def _cfg(tmp_path, *overrides):
    return compose(["model=pixels", *overrides], tmp_path)


def _recording_task(calls: list, score: float = 1.0):
    """A tracked task that records each call (its run id and batch size) and logs one score."""

    @task.tracked_task
    def recorded(cfg, tracker):
        calls.append((tracker.run_id, cfg.batch_size))
        tracker.log_metrics({"score": score})
        return {"score": score}

    return recorded


def test_a_tracked_task_runs_inside_one_finished_run(tmp_path):
    calls = []
    assert _recording_task(calls, 0.75)(_cfg(tmp_path)) == {"score": 0.75}
    _, (logged,) = mlflow_runs(tmp_path)
    assert calls == [(logged.info.run_id, 64)] and logged.info.status == "FINISHED"
    assert logged.data.metrics == {"score": 0.75}


def test_a_mistake_caught_before_work_leaves_no_run_and_a_later_failure_a_failed_run(tmp_path):
    """Run keys and the task's own ``prepare`` checks run before the MLflow run exists: a user's
    mistake there leaves no run at all. A failure once the task has started ends the run FAILED."""
    calls = []
    with pytest.raises(ConfigError, match="device='tpu' is not a device"):
        _recording_task(calls)(_cfg(tmp_path, "device=tpu"))

    def prepare(cfg):
        if cfg.seed == 7:
            raise ConfigError("seed=7 is refused by prepare")
        return cfg.seed * 10

    @task.tracked_task(prepare=prepare, describe=lambda cfg: f"seed {cfg.seed}")
    def prepared_task(cfg, tracker, prepared):
        calls.append(prepared)
        if prepared == 30:
            raise ConfigError("seed=3 fails once the task runs")
        return {"score": 1.0}

    with pytest.raises(ConfigError, match="seed=7 is refused"):
        prepared_task(_cfg(tmp_path, "seed=7"))
    assert calls == [] and mlflow_runs(tmp_path)[1] == []  # neither mistake left a run
    assert prepared_task(_cfg(tmp_path, "seed=2")) == {"score": 1.0}
    with pytest.raises(ConfigError, match="seed=3 fails"):
        prepared_task(_cfg(tmp_path, "seed=3"))
    assert calls == [20, 30]
    _, runs = mlflow_runs(tmp_path)
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("seed 2", "FINISHED"), ("seed 3", "FAILED")]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert failed.data.tags["error"] == "ConfigError: seed=3 fails once the task runs"


def test_resume_skips_a_config_with_a_finished_run_and_needs_tracking(tmp_path, caplog):
    """What a resumed sweep does job by job: a config with a FINISHED run is skipped (named, with the
    run it matched, and no new run), any other config runs."""
    caplog.set_level(logging.INFO, logger="latentmap.task")
    calls = []
    counted = _recording_task(calls)
    counted(_cfg(tmp_path))
    _, (first,) = mlflow_runs(tmp_path)
    assert counted(_cfg(tmp_path, "resume=true", "batch_size=7")) == {"score": 1.0}  # batch_size changes nothing
    assert len(calls) == 1 and len(mlflow_runs(tmp_path)[1]) == 1
    assert f"resume: skipped, same config as FINISHED run {first.info.run_id}" in caplog.text
    counted(_cfg(tmp_path, "resume=true", "seed=1"))  # another config: it runs
    assert len(calls) == 2 and len(mlflow_runs(tmp_path)[1]) == 2
    with pytest.raises(ConfigError, match="resume=true matches FINISHED runs in MLflow, but tracking=none"):
        counted(_cfg(tmp_path, "resume=true", "tracking=none"))


def _failing(error):
    def fail(cfg):
        raise error
    return fail


def test_execute_turns_a_user_error_into_one_line_and_exit_1(tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_info:
        task.execute(_failing(ConfigError("layer=14 is out of range")), _cfg(tmp_path))
    assert exit_info.value.code == 1
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["layer=14 is out of range"] and errors[0].exc_info is None


def test_execute_lets_a_crash_through_outside_a_sweep_and_returns_the_metric():
    with pytest.raises(ZeroDivisionError):
        task.execute(_failing(ZeroDivisionError("x")), None)
    assert task.execute(lambda cfg: {"knn_acc_hd": 0.5, "other": 1.0}, None, "knn_acc_hd") == 0.5
    assert task.execute(lambda cfg: {"knn_acc_hd": 0.5}, None) is None


@pytest.mark.parametrize("error,line", [
    (ConfigError("metrics.k=5 is too large"), "ConfigError: metrics.k=5 is too large"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero")])
def test_in_a_sweep_a_failing_job_is_recorded_and_the_sweep_goes_on(error, line, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(task, "_sweep_job", lambda: (tmp_path, 3))
    assert task.execute(_failing(error), None) is None  # no exit: the launcher runs the next job
    assert tracking.failed_jobs(tmp_path) == [f"#3: {line}"]
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert (record.exc_info is not None) == (not isinstance(error, ConfigError))  # a crash keeps its traceback


def test_ctrl_c_exits_130(tmp_path, caplog):
    with pytest.raises(SystemExit) as exit_info:
        task.execute(_failing(KeyboardInterrupt()), None)
    assert exit_info.value.code == 130 and "interrupted: no partial cache entry was kept" in caplog.text  # no run
    from latentmap.stopping import Terminated

    with pytest.raises(SystemExit) as exit_info:
        task.execute(_failing(Terminated()), _cfg(tmp_path))
    assert exit_info.value.code == 143
    assert "terminated (SIGTERM): the MLflow run, if it had begun, is marked KILLED, and" in caplog.text


def test_a_run_keeps_numbas_compiled_code_for_the_machine_not_the_project(tmp_path, monkeypatch):
    """A run without NUMBA_CACHE_DIR keeps numba's compiled code in this user's cache, so a run in
    another output_dir (another cache_dir) loads it instead of compiling again; where that folder
    cannot be made, it goes under the run's <cache_dir>/numba; a NUMBA_CACHE_DIR the user set stays,
    and nothing is made for the machine then."""
    import os

    import numba

    from latentmap import jit

    monkeypatch.setattr(numba.config, "CACHE_DIR", numba.config.CACHE_DIR)  # restored after the test
    monkeypatch.setattr(jit, "_chosen", [])
    seen = []

    @task.tracked_task
    def where(cfg, tracker):
        seen.append(os.environ.get("NUMBA_CACHE_DIR"))
        return {}

    for home, project in (("xdg", "a"), ("xdg", "b"), ("blocked", "c")):
        monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)  # as a user's shell (the suite sets its own)
        (tmp_path / "blocked").write_text("a file, where the cache folder would go")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / home))
        where(_cfg(tmp_path / project, "tracking=none"))  # no MLflow store: its template lives there too
    machine = str((tmp_path / "xdg" / "latentmap" / "numba").resolve())
    assert seen == [machine, machine, str((tmp_path / "c" / "cache" / "numba").resolve())]
    assert (tmp_path / "xdg" / "latentmap" / "numba").is_dir() and numba.config.CACHE_DIR == seen[-1]
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "other"))
    where(_cfg(tmp_path / "d", "tracking=none"))
    assert seen[-1] == str(tmp_path / "mine") and not (tmp_path / "other").exists()


def test_the_resume_hash_follows_local_model_files_not_only_their_path(tiny_vit, tmp_path):
    """resume=true skipped a run whose local weights had been retrained into the same folder: the
    hash held only model.name. It now holds each local model file's path, size and modification
    time (model.name's folder, model.checkpoint_path's file); a hub or timm name adds nothing."""
    import os
    import shutil

    from latentmap import tracking
    from latentmap.task import run_digest

    model = tmp_path / "model"
    shutil.copytree(tiny_vit, model)
    cfg = compose(["model=hf", f"model.name={model}"], tmp_path)
    before = run_digest(cfg)
    assert run_digest(compose(["model=hf", f"model.name={model}"], tmp_path)) == before
    weights = model / "model.safetensors"
    (model / ".git").mkdir()
    (model / ".git" / "FETCH_HEAD").write_text("a fetch touches this, not the model")
    assert run_digest(cfg) == before  # a hidden folder (a clone's .git) is not the model
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten later
    assert run_digest(cfg) != before

    checkpoint = tmp_path / "resnet.safetensors"
    checkpoint.write_bytes(b"weights")
    timm = compose(["model=timm", "model.name=resnet18", f"model.checkpoint_path={checkpoint}"], tmp_path)
    first = run_digest(timm)
    checkpoint.write_bytes(b"retrained weights")
    assert run_digest(timm) != first
    bare = compose(["model=timm", "model.name=resnet18"], tmp_path)
    assert run_digest(bare) == tracking.config_hash(bare)


def test_the_scripts_stop_on_ctrl_c_or_sigterm_in_one_line(capsys):
    """compare.py, report.py, runs.py, export.py and neighbours.py printed a 37-line KeyboardInterrupt
    traceback on Ctrl-C, and SIGTERM ended them without a word: one line now, exit 130 or 143."""
    from latentmap import stopping

    def stopped(stop):
        def main():
            raise stop
        return main

    for stop, code, said in ((KeyboardInterrupt(), 130, "interrupted"),
                             (stopping.Terminated(), 143, "terminated (SIGTERM)")):
        line = f"{said}: compare.py stopped before it finished"
        with pytest.raises(SystemExit) as exit_info:
            stopping.command(stopped(stop), "compare.py")
        assert exit_info.value.code == code and capsys.readouterr().err.strip() == line
    assert stopping.command(lambda: "run id", "compare.py") == "run id"


def test_sigterm_raises_in_the_main_process_and_ends_a_forked_worker_as_before():
    """After handle_sigterm, SIGTERM is a Terminated (a KeyboardInterrupt) in the process that
    installed it; a forked worker (a pool shut down with terminate()) still ends quietly, killed by
    the signal, not by an exception and its traceback."""
    import multiprocessing
    import os
    import signal
    import time

    from latentmap import stopping

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stopping.handle_sigterm()
        with pytest.raises(stopping.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.2)
        worker.terminate()
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
        stopping._delivered()  # the Terminated above was seen: nothing pending for the tests after this one


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop this test makes
def test_a_sigterm_python_dropped_in_a_finaliser_still_stops_the_run():
    """A SIGTERM that lands while a __del__ or weakref callback runs (matplotlib's, while the plots are
    drawn) has its exception printed as "Exception ignored" and dropped: the run went on and ended
    FINISHED, exit 0. The next stage boundary, or the end of the command, raises it again."""
    import os
    import signal
    import time

    from latentmap import stopping
    from latentmap.runner import Laps

    class Finalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler runs in here, where its raise is dropped

    went_on = []
    with pytest.raises(stopping.Terminated):
        with stopping.sigterm_as_interrupt():
            thing = Finalised()
            del thing  # "Exception ignored in ... __del__": Python drops the Terminated
            went_on.append("after")
            Laps().lap("plots")  # the stage boundary raises it
            went_on.append("not reached")
    assert went_on == ["after"]
    stopping.raise_if_terminated()  # delivered: nothing pending for whatever runs next in this process
    assert signal.getsignal(signal.SIGTERM) is not stopping._on_sigterm
