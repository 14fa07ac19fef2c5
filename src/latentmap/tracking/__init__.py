"""The MLflow edge, split along its seams:

* :mod:`~latentmap.tracking.store`: the store URI, a client that retries a busy SQLite store, the
  lock around experiment creation, and a tracking server's reachability;
* :mod:`~latentmap.tracking.redact`: secrets replaced by ``***`` before anything is logged;
* :mod:`~latentmap.tracking.resume`: the config hash ``resume=true`` matches;
* :mod:`~latentmap.tracking.run`: one run (:class:`Tracker`, :func:`start_run`) and the clean-up
  of runs whose process died;
* :mod:`~latentmap.tracking.sweep`: a multirun's parent run and its failed-job markers.

Nothing here imports study, model or plotting code.
"""

import os

# MLflow draws a "Downloading artifacts" progress bar for every read, even of a local file (a
# report reads dozens): off unless the user turned it on.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from latentmap.tracking.redact import REDACTED, redact, redact_yaml_text
from latentmap.tracking.resume import RESUME_IGNORES, config_hash, finished_run_with
from latentmap.tracking.run import PARENT_ENV, Tracker, cleanup_stale_runs, flatten, logged_params, start_run, ui_link
from latentmap.tracking.store import (
    RetryingClient,
    check_reachable,
    connect,
    existing_store,
    store_lock,
    tracking_uri,
)
from latentmap.tracking.sweep import REFUSED_TAG, MultirunParentCallback, failed_jobs, mark_job_failed, mark_job_resumed

__all__ = [
    "PARENT_ENV", "REDACTED", "REFUSED_TAG", "RESUME_IGNORES", "MultirunParentCallback", "RetryingClient", "Tracker",
    "check_reachable", "cleanup_stale_runs", "config_hash", "connect", "failed_jobs", "finished_run_with",
    "existing_store", "flatten", "logged_params", "mark_job_failed", "mark_job_resumed", "redact",
    "redact_yaml_text", "start_run", "store_lock", "tracking_uri", "ui_link",
]
