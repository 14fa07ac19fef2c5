"""Housekeeping for the MLflow store.

    python scripts/runs.py cleanup [--tracking-uri sqlite:///outputs/mlflow.db] [--experiment latentmap]
                                   [--all-hosts]

`cleanup` marks KILLED every RUNNING run of this host whose process (the run's `pid` tag) is
gone, such as a run whose process was killed with SIGKILL. Runs recorded on other hosts are only
marked with --all-hosts. Every start of run.py does the same for this host's runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow.tracking import MlflowClient

from latentmap import tracking
from latentmap.errors import ConfigError


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["cleanup"])
    parser.add_argument("--tracking-uri", default="sqlite:///outputs/mlflow.db")
    parser.add_argument("--experiment", default="latentmap")
    parser.add_argument("--all-hosts", action="store_true", help="also mark RUNNING runs of other hosts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        client = MlflowClient(tracking_uri=tracking.existing_store(args.tracking_uri))
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        raise SystemExit(f"error: no experiment {args.experiment!r} in {client.tracking_uri}")
    stale = tracking.cleanup_stale_runs(client, [experiment.experiment_id], all_hosts=args.all_hosts)
    names = [f"{client.get_run(run_id).info.run_name} ({run_id})" for run_id in stale]
    print(f"marked {len(stale)} run(s) KILLED" + (": " + ", ".join(names) if stale else ""))
    if not args.all_hosts:
        _say_unchecked(client, experiment.experiment_id)
    return stale


def _say_unchecked(client, experiment_id: str) -> None:
    """The RUNNING runs cleanup cannot check from here (another host's, or one that recorded no
    process): how many, and that --all-hosts marks them."""
    import socket

    host = socket.gethostname()
    left = [run for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                              max_results=5000)
            if run.data.tags.get("host") != host or not run.data.tags.get("pid", "").isdigit()]
    if left:
        hosts = sorted({run.data.tags.get("host") or "no host recorded" for run in left})
        print(f"left {len(left)} RUNNING run(s) it cannot check from {host} ({', '.join(hosts[:4])}): they may still "
              "be running there; `--all-hosts` marks them KILLED")


def cli() -> None:
    """The installed ``latentmap-runs`` command (and ``python scripts/runs.py``)."""
    from latentmap import stopping

    stopping.command(main, "runs.py")
    sys.exit(0)


if __name__ == "__main__":
    cli()
