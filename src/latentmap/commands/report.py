"""Regenerate the layer-study summary for any set of finished runs, into a new MLflow run.

    python scripts/report.py <experiment name | parent run id | MLflow filter string>
        [--tracking-uri sqlite:///outputs/mlflow.db] [--experiment latentmap] [--max-cka-images 2000]

A parent run id selects its children; an experiment name selects its runs (parents and
earlier reports excluded); anything else is an MLflow filter string over ``--experiment``, e.g.
"params.choice.model = 'vit' and params.pool = 'cls'" (a run logs each config group's option as
``choice.<group>``, the run-level keys, and the keys its command line set).
The summary (summary.csv, depth plots, CKA heatmaps, the similarity panel with its nulls, and
report.html, the whole study on one self-contained page) is logged to a new run tagged
``latentmap.role=report`` and written under outputs/reports/<run id>/.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("latentmap.report")


def select_runs(client, selector: str, experiment_name: str):
    """(runs DataFrame, experiment id, description) for the selector."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from latentmap import study_report
    from latentmap.errors import ConfigError
    from latentmap.logged import run_id_of

    mlflow.set_tracking_uri(client.tracking_uri)
    if client.get_experiment_by_name(selector) is None:  # an experiment's name first, then a run id (or its start)
        try:
            selector = run_id_of(client, selector) or selector
        except ConfigError as error:
            raise SystemExit(f"error: {error}") from None
    if re.fullmatch(r"[0-9a-f]{32}", selector):
        try:
            parent = client.get_run(selector)
        except MlflowException as error:
            raise SystemExit(f"error: run id {selector} is not in {client.tracking_uri}") from error
        return study_report.child_runs(client, selector), parent.info.experiment_id, f"children of {selector}"
    experiment = client.get_experiment_by_name(selector)
    if experiment is not None:
        runs = mlflow.search_runs([experiment.experiment_id], max_results=50000)
        return runs, experiment.experiment_id, f"experiment {selector}"
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"error: no experiment {experiment_name!r} in {client.tracking_uri}: "
                         "pass --experiment or an existing experiment name")
    try:
        runs = mlflow.search_runs([experiment.experiment_id], filter_string=selector, max_results=50000)
    except MlflowException as error:
        first = str(error).splitlines()[0]
        raise SystemExit(f"error: {selector!r} is neither a run id, an experiment nor a valid filter: "
                         f"{first}") from error
    return runs, experiment.experiment_id, f"filter {selector!r} in {experiment_name}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("selector")
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--experiment", default="latentmap")
    parser.add_argument("--max-cka-images", type=int, default=2000)
    parser.add_argument("--output-dir", default="outputs/reports")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from mlflow.tracking import MlflowClient

    from latentmap import study_report, tracking
    from latentmap.errors import ConfigError

    if args.max_cka_images < 8:
        raise SystemExit(f"error: --max-cka-images {args.max_cka_images} must be at least 8 (the images the block "
                         "CKA is computed on; default 2000)")
    try:
        client = MlflowClient(tracking_uri=tracking.existing_store(args.tracking_uri))
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    runs, experiment_id, description = select_runs(client, args.selector, args.experiment)
    roles = []
    if not runs.empty and "tags.latentmap.role" in runs.columns:
        roles = sorted(set(runs["tags.latentmap.role"].dropna()))
        runs = runs[runs["tags.latentmap.role"].isna()]  # parents, reports, fine-tunings are not data points
    if runs.empty and roles:
        raise SystemExit(f"error: {args.selector} selects no mapping runs, only {', '.join(roles)} runs: report.py "
                         "summarises runs of run.py (a fine-tuning sweep's runs are compared in MLflow, or through "
                         "run.py experiment=finetune_study)")
    if runs.empty and description.startswith("children of"):
        raise SystemExit(f"error: {args.selector} has no child runs: report.py summarises a sweep's parent run, an "
                         "experiment or a filter (compare.py compares two runs)")
    if runs.empty or not (runs["status"] == "FINISHED").any():  # the others: named on the page as not finished
        raise SystemExit(f"error: no finished runs for {description}")
    from latentmap.targets import cannot_make

    if (why := cannot_make(Path(args.output_dir))) is not None:  # before the run: it was a traceback, the run FAILED
        raise SystemExit(f"error: --output-dir {args.output_dir} cannot be written ({why}): choose a writable folder")
    run = client.create_run(experiment_id, run_name=f"report: {description}"[:250],
                            tags={"latentmap.role": "report", "latentmap.selector": args.selector[:5000]})
    status = "FAILED"
    try:
        folder = Path(args.output_dir).resolve() / run.info.run_id
        study_report.log_summary(client, run.info.run_id, folder, runs=runs, max_cka_images=args.max_cka_images)
        finished = int((runs["status"] == "FINISHED").sum())
        client.set_tag(run.info.run_id, "latentmap.n_runs", str(finished))
        status = "FINISHED"
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (latentmap.stopping)
        status = "KILLED"
        raise
    finally:
        client.set_terminated(run.info.run_id, status=status)
    from latentmap.tracking import ui_link

    log.info("report of %d runs (%s): run %r (%s), files in %s; %s", finished, description, run.info.run_name,
             run.info.run_id, folder, ui_link(client, experiment_id, run.info.run_id))
    return run.info.run_id


def cli() -> None:
    """The installed ``latentmap-report`` command (and ``python scripts/report.py``)."""
    from latentmap import stopping

    sys.exit(0 if stopping.command(main, "report.py") else 1)


if __name__ == "__main__":
    cli()
