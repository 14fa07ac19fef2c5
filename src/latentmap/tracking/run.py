"""One tracked run: its artifact folder, mirrored to an MLflow run with params, tags, metrics and
a final status (FINISHED, FAILED with the error, KILLED on Ctrl-C).

Every run writes its artifacts (plots, arrays, tables) into its Hydra output folder first; with
``tracking=mlflow`` the folder is then logged to the run, so ``tracking=none`` leaves the same
layout on disk.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentmap.tracking.redact import redact, redact_yaml_text
from latentmap.tracking.resume import config_hash
from latentmap.tracking.store import check_reachable, connect

log = logging.getLogger(__name__)

PARENT_ENV = "LATENTMAP_PARENT_RUN_ID"
MAX_PARAM_LENGTH = 6000
_LIBRARIES = ("latentmap", "torch", "torchvision", "transformers", "timm", "scikit-learn",
              "umap-learn", "datasets", "mlflow", "hydra-core", "numpy")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"name": "x"}}`` -> ``{"model.name": "x"}``; lists and scalars as strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=False)
        commit = result.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=False).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version_tags() -> dict[str, str]:
    tags = {}
    for library in _LIBRARIES:
        try:
            tags[f"version.{library}"] = metadata.version(library)
        except metadata.PackageNotFoundError:
            continue
    return tags


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def cleanup_stale_runs(client, experiment_ids: list[str], all_hosts: bool = False) -> list[str]:
    """Mark KILLED the RUNNING runs whose process is gone; return their ids.

    A run records its ``host`` and ``pid``. On this host a run whose PID no longer exists is
    stale. Runs of other hosts cannot be checked from here: they are only marked with
    ``all_hosts`` (the user's explicit choice, e.g. after a cluster job was cancelled).
    """
    host = socket.gethostname()
    stale = []
    for run in client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        run_host, pid = run.data.tags.get("host"), run.data.tags.get("pid", "")
        if run_host == host:
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            reason = f"process {pid} on {host} is gone"
        elif all_hosts:
            reason = f"marked by cleanup --all-hosts from {host} (recorded host {run_host}, pid {pid})"
        else:
            continue
        client.set_tag(run.info.run_id, "latentmap.cleanup", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        stale.append(run.info.run_id)
        log.warning("run %s was left RUNNING (%s): marked KILLED", run.info.run_id, reason)
    return stale


class Tracker:
    """One run's artifact folder, mirrored to an MLflow run when tracking is enabled."""

    def __init__(self, artifact_dir: Path, client=None, run_id: str | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.run_id = run_id
        self.metrics: dict[str, float] = {}

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.client is not None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, str]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        items = list(params.items())
        for start in range(0, len(items), 100):
            batch = [Param(k, v) for k, v in items[start:start + 100]]
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """Log metrics at ``step`` (epochs, layers); ``metrics.json`` keeps the latest values."""
        self.metrics.update(metrics)
        (self.artifact_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
        if self.client is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def path(self, relative: str) -> Path:
        """A path inside the run's artifact folder (parents created)."""
        target = self.artifact_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def save_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Each array as ``arrays/<name>.npy`` (plain .npy, no pickles)."""
        for name, values in arrays.items():
            np.save(self.path(f"arrays/{name}.npy"), values, allow_pickle=False)

    def upload(self, local_dir: Path | None = None, artifact_path: str | None = None) -> None:
        """Log a folder (default: the whole artifact folder) to the MLflow run."""
        if self.client is not None:
            self.client.log_artifacts(self.run_id, str(local_dir or self.artifact_dir), artifact_path)


def _upload_redacted(tracker: Tracker, folder: Path, artifact_path: str) -> None:
    """Log a folder of YAML files (Hydra's .hydra) with secret-looking values redacted."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for file in folder.iterdir():
            if file.is_file():
                (Path(tmp) / file.name).write_text(redact_yaml_text(file.read_text()))
        tracker.upload(Path(tmp), artifact_path)


@contextmanager
def start_run(cfg: DictConfig, artifact_dir: Path, hydra_dir: Path | None = None) -> Iterator[Tracker]:
    """Open the run (params, tags, config first), yield a :class:`Tracker`, close with a status.

    The run ends FINISHED, FAILED (the error's first line as tag ``error``, the traceback as
    ``error.txt``) or KILLED on Ctrl-C. Artifacts written so far are uploaded in every case.
    """
    resolved = redact(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))
    artifact_dir = Path(artifact_dir)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    (artifact_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    if not cfg.tracking.enabled:
        yield Tracker(artifact_dir)
        return

    check_reachable(str(cfg.tracking.uri))
    client, experiment_id = connect(cfg.tracking)
    cleanup_stale_runs(client, [experiment_id])  # runs of this host whose process died
    tags = {"host": socket.gethostname(), "pid": str(os.getpid()), "git_commit": git_commit(),
            "latentmap.config_hash": config_hash(cfg), **_version_tags()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=cfg.tracking.get("run_name") or None, tags=tags)
    run_id = run.info.run_id
    tracker = Tracker(artifact_dir, client, run_id)
    status = "FAILED"
    try:
        tracker.log_params(flatten(resolved))
        if hydra_dir is not None and hydra_dir.is_dir():
            _upload_redacted(tracker, hydra_dir, ".hydra")
        log.info("MLflow run %s in experiment %r (%s)", run_id, cfg.tracking.experiment, client.tracking_uri)
        yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        (artifact_dir / "error.txt").write_text("".join(traceback.format_exception(error)))
        try:
            tracker.set_tags({"error": f"{type(error).__name__}: {first_line}"[:5000]})
        except Exception:  # noqa: BLE001 - the store failing must not hide the original error
            log.exception("could not record the error in MLflow")
        raise
    finally:
        try:
            from latentmap import faults

            faults.point("artifacts")
            tracker.upload()
        finally:
            client.set_terminated(run_id, status=status)
