"""The one wrapper every tracked entry point uses, and what every Hydra main does with a task.

:func:`tracked_task` turns ``task(cfg, tracker) -> scores`` into ``task(cfg) -> scores`` that checks
everything that can be checked before work (no run is created for a user's mistake), opens the
MLflow run (params, tags, config first), runs the task and closes the run: FINISHED; FAILED with
the error's line as tag ``error`` and its traceback as ``error.txt``; KILLED on Ctrl-C. With
``resume=true`` a config that already has a FINISHED run is skipped.

:func:`execute` is the body of every Hydra main (``run.py``, ``scripts/finetune.py``,
``scripts/similarity.py``): a user's mistake (:class:`ConfigError`) is one error line and exit 1;
in a sweep, a failing job is recorded and the sweep goes on, exiting 1 at its end; Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentmap import jit, settings, tracking
from latentmap.config import output_dirs
from latentmap.errors import ConfigError

log = logging.getLogger(__name__)

Scores = dict[str, float]


def tracked_task(task: Callable[..., Scores] | None = None, *, prepare: Callable[[DictConfig], Any] | None = None,
                 describe: Callable[[DictConfig], str] | None = None,
                 role: str | None = None) -> Callable[[DictConfig], Scores]:
    """``task(cfg, tracker)`` run inside one tracked run (see the module docstring).

    Everything that can be checked before work starts is checked before the MLflow run is created,
    so a user's mistake leaves no run behind: every setting (:func:`latentmap.settings.check`), and
    ``prepare(cfg)`` when given (the task's own checks, e.g. the dataset's size against
    ``metrics.k``); its result is passed on as ``task(cfg, tracker, prepared)``. ``describe(cfg)``
    names the run in MLflow (default: the task's name). ``role`` tags every run of the task, failed
    ones too, as ``latentmap.role`` (a fine-tuning run, a study): the commands that read mapping runs
    (report.py, compare.py) pass over them. A finished run ends with one closing line
    (:meth:`Tracker.report`).
    """

    def wrap(task: Callable[..., Scores]) -> Callable[[DictConfig], Scores]:
        @functools.wraps(task)
        def run_tracked(cfg: DictConfig) -> Scores:
            roles = {"latentmap.role": role} if role else {}
            try:
                settings.check(cfg)  # every setting against its one rule, before any run exists
                _check_cache_dir(cfg)
            except ConfigError as error:
                _record_refused_job(cfg, error, describe, task.__name__, roles)
                raise
            if cfg.get("cache_dir"):  # numba's compiled code, shared by every run on the machine
                jit.cache_for_runs(cfg.cache_dir)
            from latentmap import data

            data.reset_notices()
            if cfg.get("output_dir"):  # before any image folder is read: one inside it passes over it
                data.mark_output_folder(str(cfg.output_dir))
            # The config hash resume=true matches, of the command's config: a task's prepare may fill in
            # what it reads (the fine-tuning study, its record's model and images), after the lookup.
            digest = run_digest(cfg)
            if cfg.get("resume"):
                if not cfg.tracking.enabled:
                    raise ConfigError("resume=true matches FINISHED runs in MLflow, but tracking=none: "
                                      "use tracking=mlflow")
                matched = tracking.finished_run_with(cfg, digest)
                if matched is not None:
                    log.info("resume: skipped, same config as FINISHED run %s", matched.info.run_id)
                    if (sweep := _sweep_job()) is not None:  # the sweep's summary includes that run
                        tracking.mark_job_resumed(*sweep, matched.info.run_id)
                    return dict(matched.data.metrics)
            try:
                prepared = prepare(cfg) if prepare is not None else None
            except ConfigError as error:
                _record_refused_job(cfg, error, describe, task.__name__, roles)
                raise
            except Exception as error:  # a crash (a model that will not load): a FAILED run with its traceback
                _record_failed_prepare(cfg, error, describe, task.__name__, digest, roles)
                raise
            artifact_dir, hydra_dir = output_dirs(cfg)
            name = describe(cfg) if describe is not None else task.__name__
            with tracking.start_run(cfg, artifact_dir, hydra_dir, name, digest, roles) as tracker:
                scores = task(cfg, tracker, prepared) if prepare is not None else task(cfg, tracker)
            tracker.report(scores)
            return scores

        return run_tracked

    return wrap(task) if task is not None else wrap


def run_digest(cfg: DictConfig) -> str:
    """The config hash ``resume=true`` matches: the config's, the local model files it names (their
    paths, sizes and modification times: weights retrained into the same folder were skipped as the
    same config) and, for a fine-tuning study, the bytes of its checkpoint, which a fine-tuning of the
    same name replaces at the same path (it was skipped)."""
    inputs = _local_model_stamps(cfg)
    folder = cfg.get("finetuned")
    if isinstance(folder, str) and Path(folder).expanduser().is_dir():
        from latentmap.models.base import dir_fingerprint

        inputs["finetuned_files"] = dir_fingerprint(Path(folder).expanduser())
    return tracking.config_hash(cfg, inputs)


def _local_model_stamps(cfg: DictConfig) -> dict[str, str]:
    """``{"model.<key>_files": stamp}`` for each of the model's ``name`` and ``checkpoint_path`` that
    is a local file or folder: a hash of each file's path in it, size and modification time (cheap;
    the embedding cache's key hashes the bytes). A bare name (timm's ``resnet18``) is a model's."""
    import hashlib

    node = cfg.get("model")
    stamps = {}
    for key in ("name", "checkpoint_path"):
        value = node.get(key) if isinstance(node, DictConfig) else None
        if not isinstance(value, str) or not value or (key == "name" and "/" not in value and "~" not in value):
            continue
        path = Path(value).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(  # not .git/ or .cache/: a fetch or
            part.startswith(".") for part in p.relative_to(path).parts)) if path.is_dir() else \
            [path] if path.is_file() else []  # a copy touches those, not the model
        if files:
            digest = hashlib.sha256()
            for file in files:
                info = file.stat()
                digest.update(f"{file.relative_to(path) if path.is_dir() else ''}|{info.st_size}|"
                              f"{info.st_mtime_ns}\n".encode())
            stamps[f"model.{key}_files"] = digest.hexdigest()
    return stamps


def _check_cache_dir(cfg: DictConfig) -> None:
    """``cache_dir`` made and writable, or one ConfigError line before any run exists (a cache_dir
    on /proc, or under a file, was a traceback at extraction, the run FAILED)."""
    from latentmap.targets import cannot_make

    if cfg.get("cache_dir") and (why := cannot_make(Path(str(cfg.cache_dir)))) is not None:
        raise ConfigError(f"cache_dir={str(cfg.cache_dir)!r} cannot be written ({why}): choose a writable folder, "
                          "e.g. cache_dir=~/.cache/latentmap")


def _record_refused_job(cfg: DictConfig, error: ConfigError, describe: Callable[[DictConfig], Any] | None,
                        task_name: str, roles: dict[str, str]) -> None:
    """In a tracked sweep, a job refused before work still gets its FAILED child run (its params,
    config and the error's line as tag ``error``, tagged ``latentmap.refused``), so that the sweep's
    parent, its description and its report show every job the sweep ran; a single run refused so
    leaves no run behind."""
    if _sweep_job() is not None and os.environ.get(tracking.PARENT_ENV):
        if _failed_run(cfg, error, describe, task_name, None, {tracking.REFUSED_TAG: "true", **roles}):
            log.info("job refused before work: its FAILED run is under the sweep's parent run")


def _record_failed_prepare(cfg: DictConfig, error: Exception, describe: Callable[[DictConfig], Any] | None,
                           task_name: str, digest: str, roles: dict[str, str]) -> None:
    """A crash in a task's ``prepare`` (not a user's mistake: a model file that will not load, the
    memory running out) ends in a FAILED run with its traceback as ``error.txt``, as a crash in the
    task does, in a single run and a sweep alike."""
    _failed_run(cfg, error, describe, task_name, digest, roles)


def _failed_run(cfg: DictConfig, error: Exception, describe: Callable[[DictConfig], Any] | None, task_name: str,
                digest: str | None, tags: dict[str, str]) -> bool:
    """Open the run ``error`` ended before it began, and close it FAILED with ``error`` (tracking on
    only); whether it was recorded. Recording must not hide the error: if it fails too (the tracking
    settings are the mistake), the error's own line is what the user reads."""
    if not _tracking_on(cfg):
        return False
    try:
        try:
            name = describe(cfg) if describe is not None else task_name
        except Exception:  # noqa: BLE001 - a config refused may not describe itself: the swept values name it
            name = task_name
        artifact_dir, hydra_dir = output_dirs(cfg)
        with tracking.start_run(cfg, artifact_dir, hydra_dir, name, digest, tags):
            raise error
    except Exception as raised:  # noqa: BLE001 - the record is a courtesy; the error is what matters
        if raised is error:
            return True
        log.debug("could not record the failed job in MLflow", exc_info=True)
    return False


def _tracking_on(cfg: DictConfig) -> bool:
    return bool(cfg is not None and cfg.get("tracking") and cfg.tracking.get("enabled"))


def _sweep_job() -> tuple[str, int] | None:
    """(sweep folder, job number) when this is a job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().sweep.dir, HydraConfig.get().job.num
    return None


def execute(task: Callable[[DictConfig], Scores], cfg: DictConfig, metric: str | None = None) -> float | None:
    """Run ``task(cfg)`` as a Hydra job and return ``scores[metric]`` (the value a sweeper optimises)."""
    from latentmap import stopping

    try:
        # SIGTERM as Ctrl-C here too: a launcher's worker process (joblib's) never ran the command's setup
        with stopping.sigterm_as_interrupt():
            scores = task(cfg)
    except Exception as error:  # noqa: BLE001 - one job's failure must not stop a sweep's other jobs
        sweep = _sweep_job()
        if isinstance(error, ConfigError):
            log.error("%s", error)  # a user error: one line, no traceback
        elif sweep is None:
            raise
        else:
            log.exception("job failed")  # a crash: its traceback, then the sweep goes on
        if sweep is None:
            sys.exit(1)
        tracking.mark_job_failed(*sweep, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (latentmap.stopping)
        logged = " the MLflow run, if it had begun, is marked KILLED, and" if _tracking_on(cfg) else ""
        log.warning("%s:%s no partial cache entry was kept", stopping.what(stop), logged)
        sys.exit(stopping.exit_code(stop))
    return scores.get(metric) if metric else None
