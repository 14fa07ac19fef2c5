"""One tracked run: its artifact folder, mirrored to an MLflow run with params, tags, metrics and
a final status (FINISHED, FAILED with the error, KILLED on Ctrl-C).

Artifacts are stored once. With ``tracking=mlflow`` and a local artifact store (the default), a
run writes its plots, arrays and tables straight into its MLflow artifact folder; with a remote
store (a tracking server) it writes them into its Hydra output folder, logs them, and removes the
local copy once the upload succeeded. With ``tracking=none`` they stay in the Hydra output folder
(``artifacts/``), in the same layout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from latentmap import stats
from latentmap.tracking.redact import redact, redact_yaml_text
from latentmap.tracking.resume import config_hash
from latentmap.tracking.store import check_reachable, connect

log = logging.getLogger(__name__)

PARENT_ENV = "LATENTMAP_PARENT_RUN_ID"
MAX_PARAM_LENGTH = 6000
HEADLINE = ("knn_acc_hd", "probe_acc", "trustworthiness", "silhouette_2d")  # the closing line's metrics
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


def _git(*args: str) -> str:
    """``git <args>`` in the folder of the script being run (the code's version, wherever the cwd)."""
    import sys

    folder = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=False,
                              cwd=folder if folder.is_dir() else None).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def source_tags() -> dict[str, str]:
    """MLflow's standard source, git and user tags (the UI's Source and User columns)."""
    import getpass
    import sys

    from mlflow.utils import mlflow_tags as names

    tags = {names.MLFLOW_SOURCE_TYPE: "LOCAL", names.MLFLOW_SOURCE_NAME: str(Path(sys.argv[0]).resolve())}
    try:
        tags[names.MLFLOW_USER] = getpass.getuser()
    except (KeyError, OSError):
        pass
    commit = git_commit()
    if commit != "unknown":
        tags[names.MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags[names.MLFLOW_GIT_DIRTY] = str(commit.endswith("-dirty")).lower()
        branch, remote = _git("rev-parse", "--abbrev-ref", "HEAD"), _git("remote", "get-url", "origin")
        if branch:
            tags[names.MLFLOW_GIT_BRANCH] = branch
        if remote:  # without any user:token@ a https remote may carry
            tags[names.MLFLOW_GIT_REPO_URL] = re.sub(r"(?<=://)[^/@]+@", "", remote)
    return {**tags, "git_commit": commit}


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
        if run_host == host and pid.isdigit():
            if _pid_alive(int(pid)):
                continue
            reason = f"process {pid} on {host} is gone"
        elif all_hosts:
            reason = (f"marked by cleanup --all-hosts from {host} (recorded host {run_host or 'unknown'}, "
                      f"pid {pid or 'unknown'})")
        else:
            continue
        client.set_tag(run.info.run_id, "latentmap.cleanup", reason)
        client.set_terminated(run.info.run_id, status="KILLED")
        stale.append(run.info.run_id)
        log.warning("run %r (%s) was left RUNNING (%s): marked KILLED", run.info.run_name, run.info.run_id, reason)
    return stale


def ui_link(client, experiment_id: str, run_id: str) -> str:
    """How to open a run in MLflow's UI: the server's page, or the ``mlflow ui`` command and its page."""
    uri = str(client.tracking_uri)
    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page}"
    import shlex

    # quoted for the shell where it must be (a store path with spaces), so that the command pastes as it is
    return f"open with `mlflow ui --backend-store-uri {shlex.quote(uri)}`, then http://127.0.0.1:5000/{page}"


class Tracker:
    """One run's artifact folder, mirrored to an MLflow run when tracking is enabled."""

    def __init__(self, artifact_dir: Path, client=None, run_id: str | None = None):
        self.artifact_dir = Path(artifact_dir)
        self.artifact_dir.mkdir(parents=True, exist_ok=True)
        self.client = client
        self.run_id = run_id
        self.metrics: dict[str, float] = {}
        self.status = "RUNNING"

    def log_dataset(self, name: str, digest: str, source: dict[str, Any], profile: dict[str, Any]) -> None:
        """The run's images as an MLflow dataset input (the UI's Dataset column); ``digest`` is the
        dataset's fingerprint, so runs on the same images show the same dataset."""
        if self.client is None:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        dataset = Dataset(name=name[:500], digest=digest[:36], source_type="latentmap",
                          source=json.dumps(source), profile=json.dumps(profile))
        inputs = [DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "embedded")])]
        for attempt in range(4):
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
                return
            except MlflowException as error:
                # Two jobs of a parallel sweep registering the same dataset at once: MLflow's store
                # checks, then inserts, so the later insert can hit the unique key. The next try
                # finds the dataset and only links it to this run.
                if "UNIQUE constraint" not in str(error) or attempt == 3:
                    log.warning("could not log the dataset input to MLflow: %s", str(error).splitlines()[0])
                    return
                time.sleep(0.1 * (attempt + 1))

    def report(self, scores: dict[str, float]) -> None:
        """The run's closing line: status, run id, the headline metrics (with their intervals) and
        how to open the run in MLflow's UI."""
        shown = [m for m in HEADLINE if m in scores] or list(scores)[:3]
        parts = []
        for metric in shown:
            low, high = self.metrics.get(f"{metric}_lo"), self.metrics.get(f"{metric}_hi")
            parts.append(f"{metric}={stats.shown(scores[metric], low, high)}" if low is not None
                         else f"{metric}={scores[metric]:.3f}")
        headline = ", ".join(parts) or "no metrics"
        if self.client is None:
            log.info("done: %s; artifacts in %s", headline, self.artifact_dir)
            return
        experiment = self.client.get_run(self.run_id).info.experiment_id
        where = ui_link(self.client, experiment, self.run_id)
        name = self.client.get_run(self.run_id).info.run_name
        log.info("run %r (%s) %s: %s; %s", name, self.run_id, self.status, headline, where)

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


SWEPT_ENV = "LATENTMAP_SWEPT_KEYS"  # set by the parent callback: the config keys a sweep varies


def _job_overrides() -> dict[str, str]:
    """This Hydra job's command-line overrides, ``key -> value`` (empty outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    found = {}
    for override in HydraConfig.get().overrides.task:
        key, _, value = str(override).partition("=")
        found[key.lstrip("+~")] = value
    return found


def _label(key: str, value: str, groups: set[str]) -> str:
    """How a swept setting reads at the front of a run's name: a group's option as it is (``vit``),
    the layer as ``layer 3``, a path or hub id by its last part, anything else as ``key=value``."""
    if key in groups:
        return value
    if key == "layer":
        return f"layer {value}"
    shown = (Path(value).name or value) if "/" in value else value
    return f"{key}={shown}"


def run_name(cfg: DictConfig, described: str | dict[str, str]) -> str:
    """``tracking.run_name`` when set; else what the sweep varies first (MLflow's Run Name column
    shows about 25 characters, and a sweep's runs must differ in them), then the rest of
    ``described``: a string, or ``{config key: text}`` parts (``{"model": "vit-base-patch16-224",
    "layer": "layer 3", "pool": "cls", "reducer": "UMAP"}``) of which those the sweep varies are
    said once, at the front."""
    if cfg.tracking.get("run_name"):
        return str(cfg.tracking.run_name)
    swept = [key for key in os.environ.get(SWEPT_ENV, "").split(",") if key and key in _job_overrides()]
    overrides = _job_overrides()
    groups = set(_choice_params())
    parts = described if isinstance(described, dict) else {}

    def part_of(key: str) -> str | None:  # the described part that states this key's value (model.name: model)
        return next((part for part in parts if key == part or key == f"{part}.name"), None)

    def said(key: str) -> bool:  # a text description already names it ("3 epochs")
        word, value = key.rsplit(".", 1)[-1], overrides[key]
        return not parts and (f"{word} {value}" in str(described) or f"{value} {word}" in str(described))

    front = [_label(key, overrides[key], groups) if key in groups or part_of(key) is None else parts[part_of(key)]
             for key in swept if not said(key)]
    stated = {part_of(key) for key in swept} | {key for key in swept if key in groups}
    rest = [text for part, text in parts.items() if part not in stated] if parts else [str(described)]
    return " · ".join(dict.fromkeys([*front, *rest]))[:250]


def _choice_params() -> dict[str, str]:
    """``{group: option}`` this Hydra job composed (``{"model": "efficientnet_lite0"}``; a group
    with a package, ``model@model_b``, by its package); empty outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {group.split("@")[-1]: str(option) for group, option in HydraConfig.get().runtime.choices.items()
            if not group.startswith("hydra") and option is not None}


RECORDED_GROUPS = ("model", "dataset")  # what a fine-tuning study reads from its checkpoint's record


def logged_params(resolved: dict[str, Any]) -> dict[str, str]:
    """The params a run logs: what a user filters and compares on, each difference once.

    ``choice.<group>`` for each config group option the job composed (their names sort first, so
    MLflow's compare view, which plots the first three params that differ, shows what a sweep
    varied), every key outside a group (``seed``, ``layer``, ``pool``, ``study.k``), and the keys
    inside a group that the command line set (``model.name=...``, ``reducer.n_neighbors=30``). A
    group's other keys follow from its option and are in the run's ``config.yaml``; logging them
    too gave one sweep difference three axes (``choice.model``, ``model._target_``, ``model.name``)
    and ``nan`` cells for keys one option lacks. Outside Hydra (no choices): the whole config."""
    # A fine-tuning study (``finetuned=``) reads its base model and images from the checkpoint's
    # record, not from the groups Hydra composed: their options would name models it never read, and
    # its model.* and dataset.* (the record's, put in place by the study) are logged as they are.
    recorded = RECORDED_GROUPS if resolved.get("finetuned") else ()
    choices = {group: option for group, option in _choice_params().items() if group not in recorded}
    flat = flatten(resolved)
    if not choices:
        return flat
    overridden = set(_job_overrides())
    kept = {key: value for key, value in flat.items()
            if key.split(".", 1)[0] not in choices or key in overridden}
    return {**{f"choice.{group}": option for group, option in choices.items()}, **kept}


def _local_folder(artifact_uri: str) -> Path | None:
    """The local folder of a ``file://`` artifact URI (a local artifact store), else None."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri:
        return Path(artifact_uri)
    return None


@contextmanager
def start_run(cfg: DictConfig, artifact_dir: Path, hydra_dir: Path | None = None,
              name: str | None = None, digest: str | None = None,
              extra_tags: dict[str, str] | None = None) -> Iterator[Tracker]:
    """Open the run (params, tags, config first), yield a :class:`Tracker`, close with a status.

    ``name`` says what the run is (see :func:`run_name`); ``digest`` is its config hash, as
    ``resume=true`` computes it from the command's config (default: ``cfg``'s now); ``extra_tags`` are
    set as the run is made (``latentmap.role``: a run that fails at once has it too). The run ends
    FINISHED, FAILED (the error's first line as tag ``error``, the traceback as ``error.txt``) or
    KILLED on Ctrl-C. Artifacts are
    stored once (see the module docstring), whatever the status.
    """
    resolved = redact(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))
    config_text = OmegaConf.to_yaml(resolved)
    if not cfg.tracking.enabled:
        artifact_dir = Path(artifact_dir)
        artifact_dir.mkdir(parents=True, exist_ok=True)
        (artifact_dir / "config.yaml").write_text(config_text)
        yield Tracker(artifact_dir)
        return

    check_reachable(str(cfg.tracking.uri))
    client, experiment_id = connect(cfg.tracking)
    cleanup_stale_runs(client, [experiment_id])  # runs of this host whose process died
    tags = {"host": socket.gethostname(), "pid": str(os.getpid()),
            "latentmap.config_hash": digest or config_hash(cfg), **source_tags(), **_version_tags(),
            **(extra_tags or {})}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(experiment_id, run_name=run_name(cfg, name or "run"), tags=tags)
    run_id = run.info.run_id
    local = _local_folder(run.info.artifact_uri)
    if local is not None:  # write straight into the run's artifact folder: nothing to upload
        artifact_dir = local
    artifact_dir = Path(artifact_dir)
    try:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        (artifact_dir / "config.yaml").write_text(config_text)
    except OSError as error:  # the run ends FAILED with the line, not RUNNING behind a traceback
        from latentmap.errors import ConfigError

        fix = ("the experiment's artifact folder: choose a writable tracking.artifact_location with a new "
               "tracking.experiment (an experiment keeps the location it was made with)" if local is not None
               else "choose a writable output_dir")
        message = f"the run's artifact folder {artifact_dir} cannot be written ({error.strerror or error}); it is {fix}"
        try:
            client.set_tag(run_id, "error", f"ConfigError: {message}"[:5000])
        finally:
            client.set_terminated(run_id, status="FAILED")
        raise ConfigError(message) from None
    tracker = Tracker(artifact_dir, client, run_id)
    status = "FAILED"
    try:
        tracker.log_params(logged_params(resolved))
        if hydra_dir is not None and hydra_dir.is_dir():
            _upload_redacted(tracker, hydra_dir, ".hydra")
        log.info("MLflow run %s (%s) in experiment %r (%s)", run_id, run.info.run_name, cfg.tracking.experiment,
                 client.tracking_uri)
        yield tracker
        from latentmap import stopping

        stopping.raise_if_terminated()  # a SIGTERM Python dropped: KILLED, not FINISHED
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
            if local is None:
                tracker.upload()
                shutil.rmtree(artifact_dir, ignore_errors=True)  # logged: the run's copy is the one kept
        finally:
            client.set_terminated(run_id, status=status)
            tracker.status = status
