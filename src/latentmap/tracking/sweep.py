"""A multirun's parent run, and the record of its failed jobs.

:class:`MultirunParentCallback` (a Hydra callback, configured in ``conf/hydra/default.yaml``)
creates one MLflow parent run before the first job starts; jobs find it through the
``LATENTMAP_PARENT_RUN_ID`` environment variable (inherited by process launchers) and tag
themselves ``mlflow.parentRunId``. When the sweep ends, the callback calls the ``summarize``
function its config names (the layer-study summary, ``latentmap.studies.log_summary``), so the
MLflow edge imports no study code.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentmap.tracking.run import PARENT_ENV, git_commit
from latentmap.tracking.store import connect

try:  # hydra is a hard dependency; the import only gives the callback its base class
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)


class MultirunParentCallback(Callback):
    """Create one MLflow parent run per multirun, before any job starts, and close it after.

    Its status is FINISHED when every child finished, FAILED otherwise. If the sweep aborts
    (a job raised), an exit handler still closes it, so no parent is left RUNNING.
    """

    def __init__(self, summarize: str | None = None) -> None:
        """``summarize``: the dotted path of a function ``(client, run_id, folder)`` that writes
        and logs the sweep's summary to the parent run when the sweep ends (None: no summary)."""
        self._summarize = summarize
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
                  "host": socket.gethostname(), "pid": str(os.getpid()), "git_commit": git_commit()},
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
            if self._summarize:
                from hydra.utils import get_method

                get_method(self._summarize)(self._client, run_id, self._summary_dir)
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
