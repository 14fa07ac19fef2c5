"""A real multirun in a subprocess: one parent, one child per job, one extraction per model."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from helpers import ROOT, assert_one_job_failed, cache_entries, extraction, mlflow_runs, sweep_runs

sys.path.insert(0, str(ROOT / "scripts"))  # scripts/runs.py, imported by a test


def test_a_preset_s_swept_key_set_to_one_value_on_the_command_line_is_not_swept():
    """experiment=layers sweeps layer and reducer; with reducer=pca on the command line Hydra runs
    one reducer, and the parent was still named "layer × reducer · sweep"."""
    from omegaconf import OmegaConf

    from latentmap.tracking.sweep import swept_keys

    def config(task: list[str]):
        return OmegaConf.create({"hydra": {"overrides": {"task": task},
                                           "sweeper": {"params": {"layer": "range(0,12)", "reducer": "pca,umap"}}}})

    assert swept_keys(config(["experiment=layers"])) == ["layer", "reducer"]
    assert swept_keys(config(["experiment=layers", "reducer=pca"])) == ["layer"]
    assert swept_keys(config(["experiment=layers", "model=vit,resnet", "layer=3"])) == ["model", "reducer"]


def test_sweep_makes_parent_and_children_and_extracts_each_model_once(layer_sweep, tiny_vit, tiny_vit_b):
    """The shared multirun (conftest.layer_sweep: two models x two blocks, basic launcher): one
    parent, one child per job, each model extracted once (one miss, then a hit), artifacts logged."""
    client, runs = mlflow_runs(layer_sweep)
    runs = [r for r in runs if r.data.tags.get("latentmap.role") != "report"]  # test_studies adds reports
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["latentmap.children"] == "4"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    jobs = Counter((c.data.params["model.name"], c.data.params["layer"]) for c in children)
    assert set(jobs.values()) == {1} and len(jobs) == 4
    per_model = Counter((c.data.params["model.name"], c.data.tags["cache"]) for c in children)
    assert per_model == Counter({(str(tiny_vit), "miss"): 1, (str(tiny_vit), "hit"): 1,
                                 (str(tiny_vit_b), "miss"): 1, (str(tiny_vit_b), "hit"): 1})
    assert len(cache_entries(layer_sweep / "cache")) == 2
    artifacts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {".hydra", "arrays", "tables", "config.yaml"} <= artifacts
    # Runs named for what they are; the parent names what the sweep varies and describes its children.
    # Runs named for what they are, what the sweep varies first (MLflow's Run Name column shows
    # about 25 characters); the parent names what the sweep varies and describes its children.
    assert sorted(c.info.run_name for c in children) == sorted(
        f"{name} · layer {layer} · cls · PCA" for name in (tiny_vit.name, tiny_vit_b.name) for layer in (0, 1))
    assert parent.info.run_name.startswith("model.name × layer · sweep ")
    assert parent.data.params == {} and parent.data.tags["latentmap.swept"] == "model.name,layer"
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("Sweep over model.name, layer: 4 runs, 4 FINISHED.")
    block = description.split("```text\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert block[0].split() == ["model.name", "layer", "status", "knn_acc_hd", "trustworthiness", "silhouette_2d"]
    for child in children:  # each row: the swept values, the status, each metric with its interval
        m = child.data.metrics
        row = next(line for line in block[1:] if line.split()[:2] == [Path(child.data.params["model.name"]).name,
                                                                      child.data.params["layer"]])
        assert f"FINISHED  {m['knn_acc_hd']:.3f} [{m['knn_acc_hd_lo']:.3f}, {m['knn_acc_hd_hi']:.3f}]" in row
    # Params: each group's option, the run-level keys and what the command line set; no key twice.
    params = children[0].data.params
    assert params["choice.model"] == "hf" and params["choice.reducer"] == "pca" and "model.name" in params
    assert "reducer._target_" not in params and "model._target_" not in params
    assert children[0].data.tags["reducer"] == "PCA" and children[0].data.tags["model"] == params["model.name"]


def _pixels_run(output_dir, class_folder) -> list[str]:
    """The command of a small run.py job (raw pixels of 32 images, PCA) writing under ``output_dir``."""
    return [sys.executable, str(ROOT / "run.py"), f"output_dir={output_dir}", "model=pixels", "reducer=pca",
            "dataset=imagefolder", f"dataset.path={class_folder}", "batch_size=8", "metrics.k=5",
            "plots.enabled=false", "metrics.probe=false"]


def _same_run_in_process(output_dir, class_folder) -> None:
    """The job of :func:`_pixels_run`, run in this process (a fresh start of run.py, without its imports)."""
    from latentmap.runner import run

    from helpers import compose

    run(compose(["model=pixels", "reducer=pca", "dataset=imagefolder", f"dataset.path={class_folder}",
                 "batch_size=8", "metrics.k=5", "plots.enabled=false", "metrics.probe=false"], output_dir))


@pytest.mark.parametrize("signal_name,code,said", [("INT", 130, "interrupted"), ("TERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_during_extraction_ends_the_run_killed(signal_name, code, said, class_folder, tmp_path):
    """A real SIGINT (Ctrl-C) or SIGTERM (a scheduler's time limit, `docker stop`) in the middle of
    extraction (a failpoint, after the first batch is written into the staging folder): exit 130 or
    143, one warning line, a KILLED run, no cache entry, staging included. SIGTERM used to end the
    process on the spot: the run stayed RUNNING and the staging folder was left."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LATENTMAP_FAULT": f"extract:{signal_name}"}
    result = subprocess.run(_pixels_run(tmp_path, class_folder), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-2000:]
    assert "Traceback" not in output
    warnings = [line for line in output.splitlines() if "][WARNING] - " in line]
    assert len(warnings) == 1 and f"{said}: the MLflow run, if it had begun, is marked KILLED" in warnings[0]
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert cache_entries(tmp_path / "cache") == []
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_a_sweep_stopped_by_sigterm_ends_its_parent_killed_without_a_report(class_folder, tmp_path):
    """SIGTERM in the first job of a 2-job sweep (a scheduler's time limit): exit 143, that job's run
    KILLED, the next job never started, and the parent KILLED at once, not FAILED after minutes of
    report (a scheduler sends SIGKILL seconds later); the log says how to write the report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LATENTMAP_FAULT": "extract:TERM"}
    command = _pixels_run(tmp_path, class_folder)
    command[2:2] = ["-m"]  # run.py -m <overrides>
    result = subprocess.run([*command, "model.size=8,12"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 143, output[-2000:]
    client, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert [p.info.status for p in parents] == ["KILLED"] and [c.info.status for c in children] == ["KILLED"]
    assert not client.list_artifacts(parents[0].info.run_id)  # no report.html
    assert f"`python scripts/report.py {parents[0].info.run_id}` writes one" in output


def test_runs_left_running_by_a_dead_process_are_marked_killed(class_folder, tmp_path):
    """A run whose process died without a word stays RUNNING (the SIGKILL tests below make real ones);
    `scripts/runs.py cleanup`, and the next start, mark such runs KILLED and leave live ones alone."""
    import runs as runs_script

    _same_run_in_process(tmp_path, class_folder)  # creates the store and the experiment
    client, (done,) = mlflow_runs(tmp_path)
    host, experiment = done.data.tags["host"], done.info.experiment_id
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = client.create_run(experiment, tags={"host": host, "pid": str(gone.pid)})
    alive = client.create_run(experiment, tags={"host": host, "pid": str(os.getpid())})
    killed_ids = runs_script.main(["cleanup", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert killed_ids == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"  # its process is alive
    client.set_terminated(alive.info.run_id)
    orphan = client.create_run(experiment, tags={"host": host, "pid": str(gone.pid)})
    _same_run_in_process(tmp_path, class_folder)
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"


def test_joblib_parallel_sweep_extracts_once_and_goes_on_past_a_failing_job(class_folder, tmp_path):
    """hydra/launcher=joblib n_jobs=2, one SQLite store: 4 jobs needing the same embeddings, one of
    them a user error (metrics.k=16 for 32 images). The 3 others finish in two worker processes with
    one extraction (the per-key cache lock makes the others wait and hit) and no "database is locked";
    the failing job gets one error line and a FAILED run; the parent ends FAILED and the sweep exits 1
    with a closing line naming the job, and no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"output_dir={tmp_path}", "model=pixels", "reducer=pca", "dataset=imagefolder",
               f"dataset.path={class_folder}", "metrics.k=16,3,4,5", "plots.enabled=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert_one_job_failed(result, "metrics.k=16 is too large for N=32 images")
    # the probe on: the audit's label issues run in joblib's workers too (cleanlab's own process pool
    # failed there, "name 'pred_probs_by_class' is not defined", and so did every job)
    assert "database is locked" not in result.stderr
    _, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # The mistake was caught before any work: its run is FAILED and marked refused; the parent ends FAILED.
    assert sorted((int(c.data.params["metrics.k"]), c.info.status) for c in children) == (
        [(k, "FINISHED") for k in range(3, 6)] + [(16, "FAILED")])
    assert [c.data.tags.get("latentmap.refused") for c in children if c.info.status == "FAILED"] == ["true"]
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len({c.data.tags["pid"] for c in children}) == 2  # two worker processes ran them
    assert Counter(c.data.tags["cache"] for c in finished) == Counter({"miss": 1, "hit": 2})
    assert all("n_label_issues" in c.data.metrics for c in finished)
    assert len(cache_entries(tmp_path / "cache")) == 1


def _verified_entries(cache_dir) -> list[str]:
    """Cache entries a run would read (named folders), each checked against its meta.json with hashlib."""
    import hashlib
    import json

    names = []
    if not cache_dir.exists():
        return names
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
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LATENTMAP_FAULT": point}
    killed = subprocess.run(_pixels_run(tmp_path, class_folder), cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cache_dir = tmp_path / "cache"
    assert len(_verified_entries(cache_dir)) == (1 if entry_after_kill else 0)
    _, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["RUNNING"]  # what SIGKILL leaves behind
    _same_run_in_process(tmp_path, class_folder)
    _, runs = mlflow_runs(tmp_path)
    by_pid = {r.data.tags["pid"]: r for r in runs}
    assert len(by_pid) == 2
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["cache"] == ("hit" if entry_after_kill else "miss")
    assert [r.info.status for r in runs if r is not finished[0]] == ["KILLED"]
    assert len(_verified_entries(cache_dir)) == 1
    assert not list(cache_dir.glob(".tmp-*"))  # the killed writer's staging folder was removed


def test_submitit_local_shards_assemble_the_entry_one_process_would_write(class_folder, tmp_path):
    """hydra/launcher=submitit_local with dataset.shard=0/2,1/2: each job, its own process through
    submitit, extracts half of the images into the shared cache under the whole dataset's key; the
    last assembles the entry. Its meta.json (shapes, sizes, sha256) and arrays equal a one-process
    extraction's, and a later run reads it as a cache hit. Both jobs are children of one parent."""
    import numpy as np

    from latentmap import cache
    from latentmap.config import instantiate_node

    from helpers import compose
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_local",
               f"output_dir={tmp_path}", "model=pixels", "reducer=pca", "dataset=imagefolder",
               f"dataset.path={class_folder}", "batch_size=5", "dataset.shard=0/2,1/2", "plots.enabled=false",
               "metrics.probe=false"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.tags["shard_rows"] for c in children) == ["0..15", "16..31"]
    pids = {c.data.tags["pid"] for c in children}
    assert len(pids) == 2 and parents[0].data.tags["pid"] not in pids  # separate processes
    assert len(list(tmp_path.glob("multiruns/*/*/.submitit/*/*_log.out"))) == 2  # submitit ran each job

    entries = cache_entries(tmp_path / "cache")
    assert [e.name for e in entries] == [children[0].data.tags["cache_key"]]  # the shards are gone
    cfg = compose(["model=pixels", "dataset=imagefolder", f"dataset.path={class_folder}"], tmp_path)
    dataset = instantiate_node(cfg.dataset, "dataset").load(seed=0)
    single = cache.embeddings(instantiate_node(cfg.model, "model"), dataset, -1, "embed", tmp_path / "single",
                              extraction(batch_size=32))
    assert single.key == entries[0].name and single.status == "miss"
    assert (entries[0] / "meta.json").read_text() == (tmp_path / "single" / single.key / "meta.json").read_text()
    np.testing.assert_array_equal(np.load(entries[0] / "embed.npy"), single.values)
    later = cache.embeddings(instantiate_node(cfg.model, "model"), dataset, -1, "embed", tmp_path / "cache",
                             extraction())
    assert later.status == "hit" and later.key == single.key  # the mapping run extracts nothing


def test_a_sweep_whose_every_job_is_refused_leaves_no_parent_run(class_folder, tmp_path):
    """Every job a user's mistake (metrics.k above the 32 images): exit 1, one error line per job, a
    closing line without a parent link, and no run in MLflow's list (the empty parent is deleted)."""
    from helpers import run_script

    code, out = run_script(["run.py", "-m", *(_pixels_run(tmp_path, class_folder)[2:]), "metrics.k=40,50"], tmp_path)
    assert code == 1 and "Traceback" not in out, out[-3000:]
    closing = [line for line in out.splitlines() if "] sweep FAILED:" in line]
    assert len(closing) == 1 and "2 of 2 jobs failed (#0, #1)" in closing[0] and "no job finished" in closing[0]
    assert "http" not in closing[0]
    client, runs = mlflow_runs(tmp_path)
    assert runs == []  # nothing left in the experiment's list
    deleted = client.search_runs([r.experiment_id for r in client.search_experiments()], run_view_type=2)
    assert sorted(r.data.tags.get("latentmap.role") or r.data.tags.get("latentmap.refused") for r in deleted) \
        == ["parent", "true", "true"]  # the parent, and each refused job's FAILED run


def test_a_job_refused_before_work_is_a_failed_run_beside_the_jobs_that_ran(class_folder, tmp_path):
    """One job of two refused before work (metrics.k above the 32 images): the sweep goes on and exits 1,
    and the refused job is a FAILED child run with its error line and params, so that the parent's
    description counts both jobs and its report is still written."""
    from helpers import run_script

    code, out = run_script(["run.py", "-m", *(_pixels_run(tmp_path, class_folder)[2:]), "metrics.k=5,40"], tmp_path)
    assert code == 1 and "Traceback" not in out, out[-3000:]
    assert "metrics.k=40 is too large for N=32 images" in out
    closing = [line for line in out.splitlines() if "] sweep FAILED:" in line]
    assert len(closing) == 1 and "1 of 2 jobs failed (#1)" in closing[0], closing
    client, runs = mlflow_runs(tmp_path)
    parents, children = sweep_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    by_k = {c.data.params["metrics.k"]: c for c in children}
    assert sorted(by_k) == ["40", "5"] and by_k["5"].info.status == "FINISHED"
    refused = by_k["40"]
    assert refused.info.status == "FAILED" and refused.data.tags["latentmap.refused"] == "true"
    assert refused.data.tags["error"].startswith("ConfigError: metrics.k=40 is too large for N=32 images")
    assert "latentmap.refused" not in by_k["5"].data.tags and not refused.data.metrics
    note = parents[0].data.tags["mlflow.note.content"]
    assert "2 runs, 1 FINISHED" in note and "FAILED" in note
    assert {Path(a.path).name for a in client.list_artifacts(parents[0].info.run_id)} >= {"report.html", "summary.csv"}


def test_a_resumed_sweep_s_report_holds_the_runs_it_skipped(class_folder, tmp_path):
    """A sweep of 2 jobs, then the same sweep widened to 4 with resume=true: the 2 finished jobs are
    skipped, and the second parent's summary holds all 4 runs (it held the 2 new ones only, so the
    report never compared the old with the new); its tag names the 2 it resumed."""
    import pandas as pd

    from helpers import run_script

    base = _pixels_run(tmp_path, class_folder)[2:]
    code, out = run_script(["run.py", "-m", *base, "model.size=8,12"], tmp_path)
    assert code == 0, out[-2000:]
    _, runs = mlflow_runs(tmp_path)
    first = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId")}
    code, out = run_script(["run.py", "-m", *[a for a in base if a != "reducer=pca"], "reducer=pca,tsne",
                            "model.size=8,12", "resume=true"], tmp_path)
    assert code == 0, out[-2000:]
    assert out.count("resume: skipped, same config as FINISHED run") == 2
    client, runs = mlflow_runs(tmp_path)
    parents, _ = sweep_runs(runs)
    second = max(parents, key=lambda r: r.info.start_time)
    assert set(second.data.tags["latentmap.resumed"].split(",")) == first
    summary = pd.read_csv(client.download_artifacts(second.info.run_id, "summary.csv"))
    assert len(summary) == 4 and first <= set(summary["run_id"])
    # the same sweep once more: every job skipped, the parent FINISHED over the 4 runs it resumed
    code, out = run_script(["run.py", "-m", *[a for a in base if a != "reducer=pca"], "reducer=pca,tsne",
                            "model.size=8,12", "resume=true"], tmp_path)
    assert code == 0 and out.count("resume: skipped") == 4, out[-2000:]
    client, runs = mlflow_runs(tmp_path)
    third = max(sweep_runs(runs)[0], key=lambda r: r.info.start_time)
    assert third.info.status == "FINISHED" and third.data.tags["latentmap.children"] == "0"
    assert len(third.data.tags["latentmap.resumed"].split(",")) == 4
    assert "4 jobs resumed earlier FINISHED runs" in third.data.tags["mlflow.note.content"]
    assert len(pd.read_csv(client.download_artifacts(third.info.run_id, "summary.csv"))) == 4
