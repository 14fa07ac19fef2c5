"""A real multirun in a subprocess: one parent, one child per job, one extraction per model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from conftest import ROOT, cache_entries, mlflow_runs, sweep_runs


def test_sweep_makes_parent_and_children_and_extracts_each_model_once(tiny_vit, tiny_vit_b, class_folder, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", f"output_dir={tmp_path}", "reducer=pca,tsne",
               "model=hf", f"model.name={tiny_vit},{tiny_vit_b}", "dataset=imagefolder",
               f"dataset.path={class_folder}", "metrics.k=5", "plots.max_thumbnails=8"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["latentmap.children"] == "4"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    jobs = Counter((c.data.params["model.name"], c.data.params["reducer._target_"]) for c in children)
    assert set(jobs.values()) == {1} and len(jobs) == 4
    # Each model was extracted once: one miss and one hit per model, and one cache entry each.
    per_model = Counter((c.data.params["model.name"], c.data.tags["cache"]) for c in children)
    assert per_model == Counter({(str(tiny_vit), "miss"): 1, (str(tiny_vit), "hit"): 1,
                                 (str(tiny_vit_b), "miss"): 1, (str(tiny_vit_b), "hit"): 1})
    assert len(cache_entries(tmp_path / "cache")) == 2
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {".hydra", "arrays", "plots", "tables", "config.yaml"} <= artifacts


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_a_failing_job_does_not_stop_the_sweep_or_leave_a_run_running(launcher, class_folder, tmp_path):
    """One job is a user error: it fails with one error line and a FAILED run, the other jobs still
    run (in parallel under joblib), the parent ends FAILED, and the sweep exits 1 without a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    command = [sys.executable, str(ROOT / "run.py"), "-m", *extra, f"output_dir={tmp_path}", "model=pixels",
               "reducer=pca", "dataset=imagefolder", f"dataset.path={class_folder}", "dataset.limit=6,32,20",
               "metrics.k=5", "plots.enabled=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "][ERROR] - " in line]
    assert len(errors) == 1 and "metrics.k=5 is too large for N=6 images" in errors[0]
    closing = [line for line in (result.stdout + result.stderr).splitlines() if "job(s) of the sweep failed" in line]
    assert len(closing) == 1 and "1 job(s)" in closing[0], result.stderr[-1500:]
    assert "#0: ConfigError: metrics.k=5" in closing[0]
    _, runs = mlflow_runs(tmp_path)
    statuses = sorted((r.data.tags.get("latentmap.role", "child"), r.data.params.get("dataset.limit"), r.info.status)
                      for r in runs)
    assert statuses == [("child", "20", "FINISHED"), ("child", "32", "FINISHED"), ("child", "6", "FAILED"),
                        ("parent", None, "FAILED")]


def test_ctrl_c_during_extraction_ends_the_run_killed(tmp_path):
    """SIGINT while the default model extracts: exit 130, one warning line, a KILLED run, no cache entry."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"output_dir={tmp_path}", "reducer=pca"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in process.stdout:
        seen.append(line)
        if "cache miss" in line or time.monotonic() > deadline:
            break
    time.sleep(2)  # well inside the ~60 s extraction
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = "".join(seen) + rest
    assert process.returncode == 130, output[-2000:]
    assert "Traceback" not in output
    assert "interrupted: the MLflow run is marked KILLED" in output
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    cache_dir = tmp_path / "cache"
    assert not cache_dir.exists() or not cache_entries(cache_dir)


def test_runs_left_running_by_a_dead_process_are_marked_killed(class_folder, tmp_path):
    """A run whose process was SIGKILLed stays RUNNING; cleanup (and the next start) mark it KILLED."""
    import signal

    sys.path.insert(0, str(ROOT / "scripts"))
    import runs as runs_script

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), f"output_dir={tmp_path}", "reducer=pca"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "cache miss" in line:
            break
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    client, before = mlflow_runs(tmp_path)
    assert [r.info.status for r in before] == ["RUNNING"]
    assert before[0].data.tags["pid"] == str(process.pid)
    alive = client.create_run(before[0].info.experiment_id, tags={"host": before[0].data.tags["host"],
                                                                  "pid": str(os.getpid())})
    killed = runs_script.main(["cleanup", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert killed == [before[0].info.run_id]
    assert client.get_run(before[0].info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process is alive
    cache_dir = tmp_path / "cache"
    assert not cache_dir.exists() or all((p / "meta.json").is_file() for p in cache_entries(cache_dir))
    client.set_terminated(alive.info.run_id)
    # A normal start does the same for this host's runs.
    orphan = client.create_run(before[0].info.experiment_id, tags={"host": before[0].data.tags["host"],
                                                                   "pid": str(process.pid)})
    from conftest import compose
    from latentmap.runner import run

    run(compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}", "reducer=pca",
                 "metrics.k=5", "plots.enabled=false"], tmp_path))
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"


def test_joblib_parallel_sweep_on_sqlite_extracts_once(class_folder, tmp_path):
    """hydra/launcher=joblib n_jobs=2: 8 jobs needing the same embeddings, one SQLite store: 8
    FINISHED children under one parent, no "database is locked", and one extraction (the
    per-key cache lock makes the other jobs wait and hit)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"output_dir={tmp_path}", "model=pixels", "reducer=pca", "dataset=imagefolder",
               f"dataset.path={class_folder}", "metrics.k=3,4,5,6,7,8,9,10", "plots.enabled=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "database is locked" not in result.stderr
    _, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 8 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["pid"] for c in children}) == 2  # two worker processes ran them
    assert Counter(c.data.tags["cache"] for c in children) == Counter({"miss": 1, "hit": 7})
    assert len(cache_entries(tmp_path / "cache")) == 1


def test_resume_skips_finished_jobs_and_redoes_the_rest(class_folder, tmp_path):
    """A 2-job sweep, then the same 3-job sweep with resume=true and another batch_size: the 2
    finished jobs are skipped (named, with the run they matched), only the third runs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "run.py"), "-m", f"output_dir={tmp_path}", "model=pixels", "reducer=pca",
            "dataset=imagefolder", f"dataset.path={class_folder}", "plots.enabled=false"]
    first = subprocess.run([*base, "metrics.k=3,4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    _, runs = mlflow_runs(tmp_path)
    done = {r.data.params["metrics.k"]: r.info.run_id for r in runs if "mlflow.parentRunId" in r.data.tags}
    second = subprocess.run([*base, "metrics.k=3,4,5", "resume=true", "batch_size=7"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    for k in ("3", "4"):
        assert f"resume: skipped, same config as FINISHED run {done[k]}" in second.stderr
    _, runs = mlflow_runs(tmp_path)
    _, children = sweep_runs(runs)
    assert Counter(r.data.params["metrics.k"] for r in children) == Counter({"3": 1, "4": 1, "5": 1})
    assert all(r.info.status == "FINISHED" for r in runs)


def _verified_entries(cache_dir) -> list[str]:
    """Cache entries a run would read (named folders), each checked against its meta.json with hashlib."""
    import hashlib
    import json

    names = []
    for entry in (p for p in cache_entries(cache_dir) if not p.name.startswith(".")):
        meta = json.loads((entry / "meta.json").read_text())
        for name, record in meta["arrays"].items():
            raw = (entry / f"{name}.npy").read_bytes()
            assert len(raw) == record["bytes"] and hashlib.sha256(raw).hexdigest() == record["sha256"]
        names.append(entry.name)
    return names


@pytest.mark.parametrize("point,entry_after_kill", [("extract", False), ("cache-write", False), ("artifacts", True)])
def test_sigkill_at_any_point_leaves_nothing_corrupt(point, entry_after_kill, class_folder, tmp_path):
    """A real process SIGKILLed during extraction, between writing the cache files and publishing
    the entry, or while logging artifacts: no entry a later run would read is incomplete; the next
    identical run recomputes (or reuses the verified entry), finishes, and marks the dead run KILLED."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), f"output_dir={tmp_path}", "model=pixels", "reducer=pca",
               "dataset=imagefolder", f"dataset.path={class_folder}", "batch_size=8", "metrics.k=5",
               "plots.enabled=false"]
    killed = subprocess.run(command, cwd=tmp_path, env={**env, "LATENTMAP_FAULT": point}, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cache_dir = tmp_path / "cache"
    assert len(_verified_entries(cache_dir)) == (1 if entry_after_kill else 0)
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["RUNNING"]  # what SIGKILL leaves behind
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    _, runs = mlflow_runs(tmp_path)
    by_pid = {r.data.tags["pid"]: r for r in runs}
    assert len(by_pid) == 2
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["cache"] == ("hit" if entry_after_kill else "miss")
    assert [r.info.status for r in runs if r is not finished[0]] == ["KILLED"]
    assert len(_verified_entries(cache_dir)) == 1
    assert not list(cache_dir.glob(".tmp-*"))  # the killed writer's staging folder was removed


def test_submitit_local_sweep_lands_every_run_under_one_parent(class_folder, tmp_path):
    """hydra/launcher=submitit_local runs each job as its own process through submitit: 4 jobs,
    4 FINISHED runs in 4 processes, all children of the parent the callback made first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_local",
               f"output_dir={tmp_path}", "model=pixels", "reducer=pca", "dataset=imagefolder",
               f"dataset.path={class_folder}", "metrics.k=3,4,5,6", "plots.enabled=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 4 and parents[0].data.tags["pid"] not in pids  # separate processes
    assert len(list(tmp_path.glob("multiruns/*/*/.submitit/*/*_log.out"))) == 4  # submitit ran each job
