"""The MLflow edge: store and experiment, params, tags, artifacts, parent runs, final status.

Every run writes its artifacts (plots, arrays, tables) into its Hydra output folder first; with
``tracking=mlflow`` the folder is then logged to the run, so ``tracking=none`` leaves the same
layout on disk. A multirun gets a parent run, created by :class:`MultirunParentCallback`
before the first job starts; jobs find it through the ``LATENTMAP_PARENT_RUN_ID`` environment
variable (inherited by process launchers) and tag themselves ``mlflow.parentRunId``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import subprocess
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

try:  # hydra is a hard dependency; the import only gives the callback its base class
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

PARENT_ENV = "LATENTMAP_PARENT_RUN_ID"
MAX_PARAM_LENGTH = 6000
_LIBRARIES = ("latentmap", "torch", "torchvision", "transformers", "timm", "scikit-learn",
              "umap-learn", "datasets", "mlflow", "hydra-core", "numpy")


def tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///path`` absolute (and create its folder); others unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix):]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    return uri


_TRANSIENT = ("database is locked", "database table is locked", "sqlite_busy")


class RetryingClient:
    """An ``MlflowClient`` whose calls retry, with exponential backoff, the transient "database is
    locked" errors that concurrent jobs writing one SQLite store can meet."""

    def __init__(self, client, attempts: int = 8, first_wait: float = 0.2):
        self._client, self._attempts, self._first_wait = client, attempts, first_wait

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not forwarded (and no recursion while unpickling)
            raise AttributeError(name)
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        def call(*args, **kwargs):
            for attempt in range(self._attempts):
                try:
                    return attribute(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - MlflowException or SQLAlchemy's OperationalError
                    if attempt == self._attempts - 1 or not any(t in str(error).lower() for t in _TRANSIENT):
                        raise
                    wait = self._first_wait * 2**attempt
                    log.warning("MLflow store busy (%s); retrying in %.1f s", str(error).splitlines()[0][:80], wait)
                    time.sleep(wait)
            raise AssertionError("unreachable")

        return call


def _store_lock(uri: str):
    """A file lock beside a SQLite store (schema set-up and experiment creation run one at a time);
    a no-op for other stores."""
    import contextlib

    from filelock import FileLock

    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return FileLock(uri[len(prefix):] + ".lock", timeout=600)
    return contextlib.nullcontext()


def connect(tracking_cfg: DictConfig):
    """(client, experiment id) for ``tracking.uri`` / ``tracking.experiment``; the client retries
    transient lock errors (:class:`RetryingClient`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(str(tracking_cfg.uri))
    with _store_lock(uri):
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        name = str(tracking_cfg.experiment)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return client, experiment.experiment_id
        location = None
        if tracking_cfg.get("artifact_location"):
            location = Path(str(tracking_cfg.artifact_location)).resolve().as_uri()
        try:
            return client, client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by a concurrent job (another store user) in the meantime
            return client, client.get_experiment_by_name(name).experiment_id


_SECRET_KEY = re.compile(r"(token|passw(or)?d|secret|api[_-]?key|access[_-]?key|credential|authoriz)", re.IGNORECASE)
REDACTED = "***"


def redact(resolved: Any, raw: Any = None) -> Any:
    """A copy of a resolved config with secrets replaced by ``***``: values under keys that look
    like tokens, passwords or keys, and values interpolated from environment variables
    (``${oc.env:...}`` in ``raw``, the unresolved config)."""
    if isinstance(resolved, dict):
        out = {}
        for key, value in resolved.items():
            raw_value = raw.get(key) if isinstance(raw, dict) else None
            from_env = isinstance(raw_value, str) and ("${oc.env:" in raw_value or "${env:" in raw_value)
            secret = _SECRET_KEY.search(str(key)) and not isinstance(value, (dict, list, bool)) and value is not None
            out[key] = REDACTED if secret or from_env else redact(value, raw_value)
        return out
    if isinstance(resolved, list):
        raws = raw if isinstance(raw, list) and len(raw) == len(resolved) else [None] * len(resolved)
        return [redact(value, r) for value, r in zip(resolved, raws)]
    return resolved


_SECRET_LINE = re.compile(r"^(\s*(?:-\s*)?[+~]?[\w.@/-]*?(?:token|passw(?:or)?d|secret|api[_-]?key|access[_-]?key|"
                          r"credential|authoriz)[\w.-]*\s*(?:=|:\s))\s*(\S.*)$", re.IGNORECASE)


def redact_yaml_text(text: str) -> str:
    """YAML (Hydra's .hydra files): values of secret-looking keys and overrides replaced by ``***``."""
    return "\n".join(_SECRET_LINE.sub(lambda m: m.group(1) + REDACTED, line) for line in text.split("\n"))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an http(s) tracking URI: one request to the server's /health, or a one-line ConfigError."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    from latentmap.errors import ConfigError

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(
            f"tracking.uri={uri} is unreachable ({reason}): start the server (e.g. mlflow server --host "
            "127.0.0.1 --port 5000) or use tracking.uri=sqlite:///outputs/mlflow.db"
        ) from error


# Keys that do not change a run's results: left out of the config hash that resume=true matches.
RESUME_IGNORES = ("device", "batch_size", "num_workers", "resume", "output_dir", "cache_dir", "tracking",
                  "optimized_metric")


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config without :data:`RESUME_IGNORES` (tag ``latentmap.config_hash``)."""
    import hashlib

    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {key: value for key, value in resolved.items() if key not in RESUME_IGNORES}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:24]


def finished_run_with(cfg: DictConfig, digest: str) -> Any:
    """The latest FINISHED run of the experiment tagged with config hash ``digest``, or None."""
    check_reachable(str(cfg.tracking.uri))
    client, experiment_id = connect(cfg.tracking)
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string=f"attributes.status = 'FINISHED' and tags.`latentmap.config_hash` = '{digest}'")
    return runs[0] if runs else None


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


def _git_commit() -> str:
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
    tags = {"host": socket.gethostname(), "pid": str(os.getpid()), "git_commit": _git_commit(),
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


class MultirunParentCallback(Callback):
    """Create one MLflow parent run per multirun, before any job starts, and close it after.

    Its status is FINISHED when every child finished, FAILED otherwise. If the sweep aborts
    (a job raised), an exit handler still closes it, so no parent is left RUNNING.
    """

    def __init__(self) -> None:
        self._client = None
        self._run_id: str | None = None
        self._summary_dir = Path("summary")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("tracking") or not config.tracking.enabled:
            return
        self._client, experiment_id = connect(config.tracking)
        overrides = list(config.hydra.overrides.task)
        run = self._client.create_run(
            experiment_id,
            run_name=f"sweep {Path(str(config.hydra.sweep.dir)).name}",
            tags={"latentmap.role": "parent", "latentmap.sweep": " ".join(overrides)[:5000],
                  "host": socket.gethostname(), "pid": str(os.getpid()), "git_commit": _git_commit()},
        )
        self._run_id = run.info.run_id
        self._summary_dir = Path(str(config.hydra.sweep.dir)).resolve() / "summary"
        os.environ[PARENT_ENV] = self._run_id
        atexit.register(self._close)
        log.info("MLflow parent run %s", self._run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._close()
        failed = failed_jobs(Path(str(config.hydra.sweep.dir)))
        if failed:
            log.error("%d job(s) of the sweep failed (their runs are FAILED; every other job ran): %s",
                      len(failed), "; ".join(failed)[:2000])
            raise SystemExit(1)

    def _close(self) -> None:
        if self._run_id is None:
            return
        run_id, self._run_id = self._run_id, None
        os.environ.pop(PARENT_ENV, None)
        atexit.unregister(self._close)
        children = self._client.search_runs(
            [self._client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
        statuses = [child.info.status for child in children]
        status = "FINISHED" if statuses and all(s == "FINISHED" for s in statuses) else "FAILED"
        self._client.set_tag(run_id, "latentmap.children", str(len(statuses)))
        try:
            log_summary(self._client, run_id, self._summary_dir)
        except Exception:  # noqa: BLE001 - a summary problem must not leave the parent RUNNING
            log.exception("could not write the sweep summary to parent run %s", run_id)
        finally:
            self._client.set_terminated(run_id, status=status)


_FAILED_DIR = ".latentmap-failed"


def mark_job_failed(sweep_dir: Path, job_num: int, message: str) -> None:
    """Record that job ``job_num`` of a sweep failed (a file in the sweep folder, which every
    launcher's jobs share), so the sweep can go on and still exit non-zero at its end."""
    folder = Path(sweep_dir) / _FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_num}.txt").write_text(message)


def failed_jobs(sweep_dir: Path) -> list[str]:
    """``"#<job>: <message>"`` for each job of the sweep marked failed."""
    folder = Path(sweep_dir) / _FAILED_DIR
    if not folder.is_dir():
        return []
    return [f"#{p.stem}: {p.read_text()}" for p in sorted(folder.glob("*.txt"), key=lambda p: int(p.stem))]


def log_summary(client, run_id: str, folder: Path, runs=None, max_cka_images: int = 2000) -> Path:
    """Summarize ``runs`` (default: the children of ``run_id``) into ``folder`` and log it to ``run_id``."""
    from latentmap import studies

    if runs is None:
        runs = studies.child_runs(client, run_id)
    finished = runs[runs["status"] == "FINISHED"] if not runs.empty else runs
    summary = studies.summarize(finished, max_cka_images=max_cka_images)
    if summary.table.empty:
        log.info("no finished runs to summarize for %s", run_id)
        return folder
    studies.write(summary, folder)
    client.log_artifacts(run_id, str(folder))
    log.info("summary of %d runs logged to run %s", len(summary.table), run_id)
    return folder
