"""The MLflow store: its URI, a client that retries a busy SQLite store, the lock around schema
set-up and experiment creation, and the reachability check of a tracking server."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def tracking_uri(uri: str, key: str = "tracking.uri", writes: bool = True) -> str:
    """Make a relative ``sqlite:///path`` absolute (and create its folder); others unchanged. A
    folder that cannot be made, a database path that is a folder, or (``writes``) a store that
    cannot be written is one line naming ``key``: MLflow's own errors come late, as a traceback
    or as a lock waited on for minutes."""
    from latentmap.errors import ConfigError

    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path, query = _store_file(uri), uri.partition("?")[1:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{key}={uri!r}: its folder {path.parent} cannot be made ({error.strerror or error}): "
                          f"choose a writable place, e.g. {key}=sqlite:///outputs/mlflow.db") from error
    if path.is_dir():
        raise ConfigError(f"{key}={uri!r} names a folder, not a database file: e.g. {key}={prefix}{path / 'mlflow.db'}")
    if writes:
        _check_writable(path, uri, key)
    return prefix + str(path) + "".join(query)


def _check_writable(path: Path, uri: str, key: str) -> None:
    """SQLite writes the database and, beside it, its journal and latentmap's lock: both must be
    possible (a read-only folder or file, an immutable one, /proc)."""
    import tempfile

    from latentmap.errors import ConfigError

    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".latentmap-write-check-"):
            pass
        if path.exists():
            with open(path, "ab"):
                pass
    except OSError as error:
        raise ConfigError(f"{key}={uri!r}: the store {path} cannot be written ({error.strerror or error}): "
                          f"choose a writable place, e.g. {key}=sqlite:///outputs/mlflow.db") from error


def refuse_folder_store(uri: str, key: str) -> None:
    """An MLflow store MLflow 3 writes: a database, a server or Databricks, not a folder (its file
    store is in maintenance mode and refuses new work unless ``MLFLOW_ALLOW_FILE_STORE`` is set)."""
    import os

    from latentmap.errors import ConfigError

    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes"):
        return
    scheme_only = uri in ("databricks", "databricks-uc", "uc") or uri.startswith(("databricks:", "databricks-uc:"))
    if uri.startswith("file:") or ("://" not in uri and not scheme_only):
        folder = uri.removeprefix("file://").removeprefix("file:") or "."
        if Path(folder).suffix.lower() in (".db", ".sqlite", ".sqlite3") or Path(folder).is_file():
            raise ConfigError(f"{key}={uri!r} names a database file without its scheme: write it as {key}=sqlite:///"
                              f"{folder} (three slashes, then the path; an absolute path gives four)")
        raise ConfigError(f"{key}={uri!r} is a folder, and MLflow 3 no longer writes its folder store: use a database "
                          f"file, e.g. {key}=sqlite:///{folder.rstrip('/')}/mlflow.db, or a server's http:// address")


def existing_store(uri: str, key: str = "--tracking-uri", writes: bool = True) -> str:
    """:func:`tracking_uri` for a command that reads runs (and, with ``writes``, logs one): a SQLite
    store must already exist (a mistyped path made an empty store, and the command then found no
    runs in it), a server must answer (MLflow's client retries for minutes), and a folder is not a
    store MLflow 3 reads."""
    from latentmap.errors import ConfigError

    refuse_folder_store(uri, key)
    if uri.startswith("sqlite:///") and not _store_file(uri).is_file():
        raise ConfigError(f"{key}={uri!r}: there is no MLflow store at {_store_file(uri)}: pass the store your runs "
                          "were logged to (run.py's tracking.uri; by default sqlite:///outputs/mlflow.db)")
    check_reachable(uri, key=key)
    return tracking_uri(uri, key, writes)


def _store_file(uri: str) -> Path:
    """The database file of a ``sqlite:///`` URI, absolute, without SQLAlchemy's ``?options``."""
    path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
    return path if uri.startswith("sqlite:////") else path.resolve()


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


def store_lock(uri: str):
    """A file lock beside a SQLite store (schema set-up and experiment creation run one at a time);
    a no-op for other stores."""
    import contextlib

    from filelock import FileLock

    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return FileLock(uri[len(prefix):] + ".lock", timeout=600)
    return contextlib.nullcontext()


def _schema_template() -> Path:
    """Where this machine keeps an empty SQLite store of the installed MLflow's schema (one file per
    MLflow version, in :func:`latentmap.machine.user_cache`)."""
    import mlflow

    from latentmap.machine import user_cache

    return user_cache() / f"mlflow-{mlflow.__version__}-empty.db"


def _copy_sqlite(source: Path, target: Path) -> None:
    """Copy an MLflow SQLite store's schema with SQLite's own backup (consistent even if written
    meanwhile), without its experiments, to a temporary file published by rename: ``target`` is
    whole or absent. MLflow makes the Default experiment of a store without one when it opens it,
    with this store's own artifact location (a copied one would point into the first store's
    folder)."""
    import os
    import sqlite3
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with sqlite3.connect(source) as read, sqlite3.connect(temporary) as write:
            read.backup(write)
            write.execute("DELETE FROM experiment_tags")
            write.execute("DELETE FROM experiments")
        read.close()
        write.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as a file MLflow had created (mkstemp makes it 0600)
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _new_store(uri: str) -> Path | None:
    """A new SQLite store starts as a copy of an empty one of the same MLflow version: MLflow builds a
    new store's schema by running its ~60 migrations one by one (seconds), here once per machine
    instead of once per store. Called with the store's lock held, before the client opens the
    store; returns the template to write from the new store when there is none yet. Other stores are
    left to MLflow."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or Path(uri[len(prefix):]).exists():
        return None
    template = _schema_template()
    if not template.exists():
        return template
    try:
        _copy_sqlite(template, Path(uri[len(prefix):]))
    except (OSError, sqlite3_error()) as error:  # MLflow builds the store itself
        log.debug("could not start %s from %s: %s", uri, template, error)
    return None


def _keep_template(uri: str, template: Path) -> None:
    """Keep a store MLflow has just built (before any experiment of ours is in it) as the template."""
    try:
        _copy_sqlite(Path(uri[len("sqlite:///"):]), template)
    except (OSError, sqlite3_error()) as error:  # an unwritable cache folder: each store is built anew
        log.debug("no MLflow schema template at %s: %s", template, error)


def sqlite3_error() -> type:
    import sqlite3

    return sqlite3.Error


def _writable_location(value: str) -> Path:
    """``tracking.artifact_location`` as a folder made and writable here, or a ConfigError line
    (before an experiment is made with it: every run of that experiment would fail)."""
    from latentmap.errors import ConfigError
    from latentmap.targets import unwritable

    folder = Path(value).expanduser().resolve()
    if (why := unwritable(folder)) is not None:
        raise ConfigError(f"tracking.artifact_location={value!r} cannot be written ({why}): "
                          "choose a writable folder, e.g. tracking.artifact_location=outputs/artifacts")
    return folder


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI: the model view, not GenAI


def connect(tracking_cfg: DictConfig):
    """(client, experiment id) for ``tracking.uri`` / ``tracking.experiment``; the client retries
    transient lock errors (:class:`RetryingClient`). The experiment is created, or found, marked as a
    model-development experiment, so MLflow 3's UI opens it in its runs view."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(str(tracking_cfg.uri))
    with store_lock(uri):
        template = _new_store(uri)
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        name = str(tracking_cfg.experiment)
        experiment = client.get_experiment_by_name(name)  # MLflow opens (and builds) the store
        if template is not None:
            _keep_template(uri, template)
        wanted = tracking_cfg.get("artifact_location")
        if experiment is None:
            location = None
            if wanted:
                location = _writable_location(str(wanted)).as_uri()
            try:
                client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException:  # created by a concurrent job (another store user) in the meantime
                pass
            experiment = client.get_experiment_by_name(name)
        elif wanted:
            _say_other_location(experiment, str(wanted))
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return client, experiment.experiment_id


def _say_other_location(experiment, wanted: str) -> None:
    """MLflow fixes an experiment's artifact folder when the experiment is made: a
    ``tracking.artifact_location`` other than an existing experiment's is said in one line, not
    ignored silently (its artifacts would fill another disk than the one asked for)."""
    from urllib.parse import unquote, urlparse

    current = experiment.artifact_location or ""
    if current.startswith("file:"):
        current = unquote(urlparse(current).path)
    elif "://" in current or ":" in current.split("/")[0]:  # a server's mlflow-artifacts:, s3://...: not a folder here
        return
    asked = Path(wanted).expanduser().resolve()
    if current and Path(current).resolve() != asked:
        log.warning("tracking.artifact_location=%s is not where this run's artifacts go: experiment %r was made "
                    "with %s, and MLflow keeps an experiment's artifact folder; for artifacts in %s, name a new "
                    "experiment (tracking.experiment=<name>)", wanted, experiment.name, current, asked)


def check_reachable(uri: str, timeout: float = 5.0, key: str = "tracking.uri") -> None:
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
            f"{key}={uri} is unreachable ({reason}): start the server (e.g. mlflow server --host "
            f"127.0.0.1 --port 5000) or use {key}=sqlite:///outputs/mlflow.db"
        ) from error
