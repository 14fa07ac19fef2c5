"""A multirun's parent run, and the record of its failed jobs.

:class:`MultirunParentCallback` (a Hydra callback, configured in ``conf/hydra/default.yaml``)
creates one MLflow parent run before the first job starts; jobs find it through the
``LATENTMAP_PARENT_RUN_ID`` environment variable (inherited by process launchers) and tag
themselves ``mlflow.parentRunId``. When the sweep ends, the callback calls the ``summarize``
function its config names (the layer-study summary, ``latentmap.study_report.log_summary``), so the
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

from latentmap.tracking.run import PARENT_ENV, SWEPT_ENV, source_tags, ui_link
from latentmap.tracking.store import connect

try:  # hydra is a hard dependency; the import only gives the callback its base class
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)


class MultirunParentCallback(Callback):
    """Create one MLflow parent run per multirun, before any job starts, and close it after.

    Its status is FINISHED when every job finished, FAILED otherwise (a child not FINISHED, or a
    job refused before its run was created). If the sweep aborts
    (a job raised), an exit handler still closes it, so no parent is left RUNNING.
    """

    def __init__(self, summarize: str | None = None) -> None:
        """``summarize``: the dotted path of a function ``(client, run_id, folder)`` that writes
        and logs the sweep's summary to the parent run when the sweep ends (None: no summary)."""
        self._summarize = summarize
        self._client = None
        self._run_id: str | None = None
        self._summary_dir = Path("summary")
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        swept = swept_keys(config)
        os.environ[SWEPT_ENV] = ",".join(swept)  # the jobs' run names and checkpoint names read it
        if not config.get("tracking") or not config.tracking.enabled:
            if config.get("tracking") and self._summarize:  # a sweep whose report would live in its parent run
                log.info("tracking=none: this sweep has no MLflow parent run, so no report.html or compare.html; "
                         "each job's files are in its folder (tracking=mlflow writes them)")
            return
        self._client, experiment_id = connect(config.tracking)
        overrides = list(config.hydra.overrides.task)
        run = self._client.create_run(
            experiment_id,
            # What the sweep varies first (MLflow's Run Name column shows about 18 characters), then when.
            run_name=f"{' × '.join(swept) or 'one job'} · sweep {Path(str(config.hydra.sweep.dir)).name}"[:250],
            tags={"latentmap.role": "parent", "latentmap.sweep": " ".join(overrides)[:5000],
                  "latentmap.swept": ",".join(swept)[:5000],
                  "host": socket.gethostname(), "pid": str(os.getpid()), **source_tags()},
        )
        self._run_id = run.info.run_id
        self._sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        self._summary_dir = self._sweep_dir / "summary"
        os.environ[PARENT_ENV] = self._run_id
        atexit.register(self._close)
        log.info("MLflow parent run %s", self._run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_ENV, None)
        closed = self._close()
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = failed_jobs(sweep_dir)
        total = max(len(failed), sum(1 for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())) \
            if sweep_dir.is_dir() else len(failed)
        where = f"; {closed}" if closed else ""
        if failed:
            jobs = [line.split(":", 1)[0] for line in failed]
            shown = ", ".join(jobs[:20]) + (f" and {len(jobs) - 20} more" if len(jobs) > 20 else "")
            log.error("sweep FAILED: %d of %d jobs failed (%s), each said why above; %s%s", len(jobs), total, shown,
                      "no job finished" if len(jobs) >= total else f"the other {total - len(jobs)} finished", where)
            raise SystemExit(1)
        log.info("sweep FINISHED: %d of %d jobs finished%s", total, total, where)

    def _close(self) -> str:
        """Close the parent run; return where to see it (its name, id and UI link), or "" when there
        is none (tracking off, or no job started a run: the empty parent is deleted)."""
        if self._run_id is None:
            return ""
        run_id, self._run_id = self._run_id, None
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(SWEPT_ENV, None)
        atexit.unregister(self._close)
        parent = self._client.get_run(run_id)
        children = self._client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
        resumed = resumed_runs(self._sweep_dir) if self._sweep_dir is not None else []
        if resumed:  # jobs resume=true skipped: their earlier runs are this sweep's too, in its summary
            kept = resumed[:RESUMED_MAX]
            if len(kept) < len(resumed):
                log.warning("%d jobs resumed earlier runs: the parent's report holds the first %d (an MLflow tag "
                            "holds at most %d run ids)", len(resumed), len(kept), RESUMED_MAX)
            self._client.set_tag(run_id, RESUMED_TAG, ",".join(kept))
        if all(child.data.tags.get(REFUSED_TAG) == "true" for child in children) and not resumed:
            # Every job refused before work: a parent with nothing but refusals under it is noise (a
            # refused job's FAILED run is kept only beside jobs that ran, where the sweep needs it).
            for child in children:
                self._client.delete_run(child.info.run_id)
            self._client.set_terminated(run_id, status="FAILED")
            self._client.delete_run(run_id)
            log.info("no job started work: the sweep's MLflow parent run and its refused jobs' runs were deleted")
            return ""
        statuses = [child.info.status for child in children] + ["FINISHED"] * len(resumed)  # resumed: FINISHED
        # A job refused before work (a user's mistake) has no run: its failure marker counts too.
        failed = failed_jobs(self._sweep_dir) if self._sweep_dir is not None else []
        status = ("FINISHED" if statuses and all(s == "FINISHED" for s in statuses) and not failed
                  else "KILLED" if "KILLED" in statuses else "FAILED")  # KILLED: Ctrl-C or SIGTERM stopped a job
        self._client.set_tag(run_id, "latentmap.children", str(len(children)))
        try:
            swept = [k for k in parent.data.tags.get("latentmap.swept", "").split(",") if k]
            note = describe_children(children, swept) if children else ""
            if resumed:
                note += (f"\n\n{len(resumed)} job{'s' if len(resumed) != 1 else ''} resumed earlier FINISHED runs "
                         f"(resume=true), in this sweep's report: {', '.join(resumed)}")
            self._client.set_tag(run_id, "mlflow.note.content", note.strip()[:60000])
        except Exception:  # noqa: BLE001 - a description problem must not leave the parent RUNNING
            log.exception("could not describe parent run %s", run_id)
        try:
            if status == "KILLED":  # stopped: a scheduler allows seconds before SIGKILL, not a report's minutes
                log.info("the sweep was stopped: no report.html; `python scripts/report.py %s` writes one from "
                         "its finished runs", run_id)
            elif self._summarize and "FINISHED" in statuses:  # nothing to summarise, or compare, otherwise
                from hydra.utils import get_method

                get_method(self._summarize)(self._client, run_id, self._summary_dir)
        except Exception:  # noqa: BLE001 - a summary problem must not leave the parent RUNNING
            log.exception("could not write the sweep summary to parent run %s", run_id)
        finally:
            self._client.set_terminated(run_id, status=status)
        link = ui_link(self._client, parent.info.experiment_id, run_id)
        return f"parent run {parent.info.run_name!r} ({run_id}): {link}"


def swept_keys(config: DictConfig) -> list[str]:
    """The config keys a sweep varies: command-line overrides with several values (``reducer=pca,umap``,
    ``layer='range(0,5)'``) and the sweeper's own ``params`` (a preset's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys, fixed = [], set()
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([str(o) for o in config.hydra.overrides.task])
        keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
        fixed = {o.get_key_element().lstrip("+~") for o in parsed if not o.is_sweep_override()}
    except Exception:  # noqa: BLE001 - a name is a nicety; Hydra has already accepted these overrides
        log.debug("could not parse the sweep's overrides", exc_info=True)
    params = config.hydra.get("sweeper", {}).get("params") or {}
    for key, value in params.items():
        # A preset's swept key that the command sets to one value (experiment=layers reducer=pca) is
        # not swept: the command's value replaces the preset's list.
        if str(key) in keys or str(key) in fixed:
            continue
        try:
            swept = parser.parse_override(f"{key}={value}").is_sweep_override()
        except Exception:  # noqa: BLE001 - as above: name it, as before
            swept = True
        if swept:
            keys.append(str(key))
    return keys


def fixed_width(header: list[str], rows: list[list[str]]) -> str:
    """A table as aligned plain text (two spaces between columns): readable in a terminal and, in a
    fenced block, in any Markdown renderer, where a Markdown table's cells can run together."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in [header, *rows])


def _swept_value(child, key: str) -> str:
    params = child.data.params
    value = params.get(f"choice.{key.split('@')[-1]}", params.get(key, ""))  # model@model_b: choice.model_b
    return Path(value).name if "/" in value else value


def describe_children(children, swept: list[str]) -> str:
    """The parent run's description (Markdown, shown on its page in MLflow's UI): what the sweep
    varied, and one row per child with the swept values, its status and the headline metrics (with
    intervals where logged), as an aligned table in a fenced block."""
    from latentmap.tracking.run import HEADLINE

    metrics = [m for m in HEADLINE if any(m in c.data.metrics for c in children)]
    rows = []
    for child in sorted(children, key=lambda c: [_swept_value(c, k) for k in swept] + [c.info.run_name or ""]):
        cells = []
        for metric in metrics:
            value = child.data.metrics.get(metric)
            low, high = child.data.metrics.get(f"{metric}_lo"), child.data.metrics.get(f"{metric}_hi")
            cells.append("" if value is None else f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]"
                                                                    if low is not None and high is not None else ""))
        names = [_swept_value(child, k) for k in swept] if swept else [child.info.run_name or child.info.run_id[:8]]
        rows.append([*names, child.info.status, *cells])
    finished = sum(c.info.status == "FINISHED" for c in children)
    head = (f"Sweep over {', '.join(swept)}: " if swept else "Sweep: ") + f"{len(children)} runs, {finished} FINISHED. "
    table = fixed_width([*(swept or ["run"]), "status", *metrics], rows)
    return (head + "Headline metrics with their confidence intervals in brackets; report.html (in this run's "
            "artifacts) compares the runs.\n\n```text\n" + table + "\n```\n")


_FAILED_DIR = ".latentmap-failed"
REFUSED_TAG = "latentmap.refused"  # a sweep job's FAILED run for a job refused before work (a user's mistake)


def mark_job_failed(sweep_dir: Path, job_num: int, message: str) -> None:
    """Record that job ``job_num`` of a sweep failed (a file in the sweep folder, which every
    launcher's jobs share), so the sweep can go on and still exit non-zero at its end."""
    folder = Path(sweep_dir) / _FAILED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_num}.txt").write_text(message)


_RESUMED_DIR = ".latentmap-resumed"
RESUMED_TAG = "latentmap.resumed"  # a parent's tag: the FINISHED runs its jobs resumed, comma-separated
RESUMED_MAX = 240  # run ids (32 characters and a comma) in the tag: within MLflow's 8,000 characters


def mark_job_resumed(sweep_dir: Path, job_num: int, run_id: str) -> None:
    """Record that job ``job_num`` of a sweep was skipped by ``resume=true`` for the FINISHED run
    ``run_id`` (a child of an earlier sweep), so that the parent's summary includes it."""
    folder = Path(sweep_dir) / _RESUMED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_num}.txt").write_text(run_id)


def resumed_runs(sweep_dir: Path) -> list[str]:
    """The run ids of the sweep's jobs that ``resume=true`` skipped, by job number."""
    folder = Path(sweep_dir) / _RESUMED_DIR
    if not folder.is_dir():
        return []
    return [p.read_text().strip() for p in sorted(folder.glob("*.txt"), key=lambda p: int(p.stem))]


def failed_jobs(sweep_dir: Path) -> list[str]:
    """``"#<job>: <message>"`` for each job of the sweep marked failed."""
    folder = Path(sweep_dir) / _FAILED_DIR
    if not folder.is_dir():
        return []
    return [f"#{p.stem}: {p.read_text()}" for p in sorted(folder.glob("*.txt"), key=lambda p: int(p.stem))]
