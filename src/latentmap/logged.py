"""A finished run, read back from MLflow: its arrays, and its images (no model needed).

The arrays come from the run's ``arrays/`` artifacts. The images come from the dataset its logged
``config.yaml`` describes, loaded again with the same seed; every row's dataset index and label
must match the logged ones, so a dataset changed since the run is refused rather than mislabelled.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentmap.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LoggedRun:
    run_id: str
    embeddings: np.ndarray  # (N, D)
    coords: np.ndarray  # (N, 2)
    labels: np.ndarray  # (N,), -1 when unlabelled
    indices: np.ndarray  # (N,) dataset index of each row
    class_names: list[str]
    config: Any  # the run's resolved config (DictConfig)
    _dataset: Any = field(default=None, repr=False)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the other per-image arrays (audit_*, outlier_score)
    fingerprint: str = ""  # the run's dataset_fingerprint tag (data.fingerprint of its images); "": not logged
    skipped: int = 0  # images the run passed over as unreadable (its n_skipped metric)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names) and bool((self.labels >= 0).all())

    def caption(self, row: int) -> str:
        from latentmap.plots import NAME_CHARACTERS, shortened

        name = shortened(self.class_names[self.labels[row]], NAME_CHARACTERS["caption"]) if self.labelled else ""
        return f"{name} #{self.indices[row]}".strip()

    def row_of(self, index: int) -> int:
        """The row of dataset index ``index``, or a one-line error naming the valid range."""
        found = np.flatnonzero(self.indices == index)
        if len(found) == 0:
            low, high, count = int(self.indices.min()), int(self.indices.max()), len(self.indices)
            which = (f"run {low}..{high}" if count == high - low + 1 else
                     f"are {count} of {low}..{high}, e.g. {', '.join(str(i) for i in np.sort(self.indices)[:5])}")
            raise ConfigError(f"--index {index} is not an image of run {self.run_id}: its dataset indices "
                              f"{which} ({count} images)")
        return int(found[0])

    def dataset(self):
        """The run's dataset, loaded again from its config and checked row by row."""
        if self._dataset is None:
            from latentmap import data
            from latentmap.config import instantiate_node

            seed = self.config.get("data_seed", self.config.seed)  # logged before the key: seed
            dataset = instantiate_node(self.config.dataset, "dataset").load(seed=int(seed))
            indices = data.column(dataset, "index")
            labels = data.labels_of(dataset)
            labels = np.full(len(indices), -1) if labels is None else labels
            loaded = dataset  # every image, as the run fingerprinted them
            if self.skipped and len(indices) == len(self.indices) + self.skipped:
                # The run passed over unreadable images (dataset.on_error=skip): its rows are the
                # dataset's rows less those, in order.
                kept = np.flatnonzero(np.isin(indices, self.indices))
                if len(kept) == len(self.indices):
                    dataset, indices, labels = dataset.select(kept), indices[kept], labels[kept]
            if not (np.array_equal(indices, self.indices) and np.array_equal(labels, self.labels)):
                raise ConfigError(f"the dataset of run {self.run_id} ({self.config.dataset.get('_target_')}) "
                                  "no longer matches the run's logged indices and labels")
            names = [str(name) for name in (data.class_names(loaded) or [])]
            if self.class_names and names != [str(name) for name in self.class_names]:
                # A renamed class folder keeps every label number (classes are numbered in sorted order), so
                # the pictures would show one class's images under another's name.
                now = set(names)
                gone = [str(name) for name in self.class_names if str(name) not in now][:3]
                raise ConfigError(f"the classes of run {self.run_id}'s dataset changed since it ran"
                                  + (f" ({', '.join(gone)} no longer there)" if gone else "")
                                  + ": a class folder was renamed, added or removed, so its images would be shown "
                                  "under other names; restore the folder's classes, or run the dataset again")
            if self.fingerprint and data.fingerprint(loaded) != self.fingerprint.split("|", 1)[0]:
                log.warning("the images of run %s have changed or moved since it ran (their fingerprint differs, "
                            "though the indices and labels match): the pictures show the files as they are now",
                            self.run_id)
            self._dataset = dataset
        return self._dataset

    def thumbnails(self, rows, size: int = 48) -> list[np.ndarray]:
        from latentmap import data
        from latentmap.figures import thumbnail_arrays

        return thumbnail_arrays(self.dataset(), np.asarray(rows), size=size,
                                **data.reading_of(self.config.get("dataset")))


def _download_folder(run_id: str) -> Path:
    """A temporary folder for a run's downloaded artifacts, removed at exit (they are read from it
    until then: arrays are memory-mapped)."""
    folder = Path(tempfile.mkdtemp(prefix=f"latentmap-{run_id[:8]}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def load(run_id: str, tracking_uri: str) -> LoggedRun:
    """Download and read a run's arrays and config (one clear error for an unknown run)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from latentmap import tracking

    client = MlflowClient(tracking_uri=tracking.existing_store(tracking_uri, writes=False))
    run_id = run_id_of(client, run_id) or run_id
    try:
        logged = client.get_run(run_id).data
        tags = logged.tags
    except MlflowException as error:
        raise ConfigError(f"run {run_id!r} is not in {tracking_uri} (pass --tracking-uri)") from error
    if tags.get("latentmap.role"):  # a study's arrays/ holds other arrays (a run that failed late keeps its own)
        raise ConfigError(not_a_mapping_run(client, run_id) or f"run {run_id} is not a mapping run")
    if client.get_run(run_id).info.lifecycle_stage == "deleted":
        raise ConfigError(not_a_mapping_run(client, run_id))
    folder = _download_folder(run_id)
    try:
        arrays = Path(client.download_artifacts(run_id, "arrays", str(folder)))
        config = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", str(folder)))
    except (MlflowException, OSError) as error:
        raise _refuse(client, run_id, f"run {run_id} has no arrays/ or config.yaml artifacts: "
                      "is it a finished mapping run?") from error

    def array(name: str) -> np.ndarray:
        return np.load(arrays / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    known = {"embeddings", "coords", "labels", "indices"}
    extra = {path.stem: np.load(path, allow_pickle=False) for path in sorted(arrays.glob("*.npy"))
             if path.stem not in known}
    return LoggedRun(run_id, array("embeddings"), np.load(arrays / "coords.npy", allow_pickle=False),
                     np.load(arrays / "labels.npy", allow_pickle=False),
                     np.load(arrays / "indices.npy", allow_pickle=False),
                     json.loads((arrays / "classes.json").read_text()), config, extra=extra,
                     fingerprint=tags.get("dataset_fingerprint", ""), skipped=int(logged.metrics.get("n_skipped", 0)))


def _pages(search, **query):
    """Everything an MLflow search returns, page by page (each call returns at most ``max_results``)."""
    token = None
    while True:
        page = search(**query, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def all_runs(client, experiment_id: str):
    """Every run of the experiment (MLflow returns at most 50,000 a call)."""
    return _pages(client.search_runs, experiment_ids=[experiment_id], max_results=50000)


def run_id_of(client, selector: str, experiment_ids: list[str] | None = None, where: str = "") -> str | None:
    """The whole run id ``selector`` names: itself (32 hex characters, in either case), or the one run
    id that begins with it (6 to 31 of them, as pages, logs and run names show ids: ``6c7a6c85``), among
    the runs of ``experiment_ids`` (default: every experiment of the store; ``where`` names the ones
    given, for the message); None when it is no id. A beginning that several runs share, or none
    does, is a ConfigError line."""
    text = selector.strip().lower()
    if re.fullmatch(r"[0-9a-f]{32}", text):
        return text
    if not re.fullmatch(r"[0-9a-f]{6,31}", text):
        return None
    fix = ("pass the whole id, or --tracking-uri for the store that holds it" if experiment_ids is None else
           "pass the whole id, --experiment for the experiment that holds it, or --tracking-uri")
    where = where or f"in {client.tracking_uri}"
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in _pages(client.search_experiments, max_results=1000)]
    matched = [run.info.run_id for experiment in experiment_ids for run in all_runs(client, experiment)
               if run.info.run_id.startswith(text)]
    if len(matched) == 1:
        return matched[0]
    if matched:
        raise ConfigError(f"{selector!r} begins {len(matched)} run ids {where}: pass more of the id "
                          f"({', '.join(sorted(m[:12] for m in matched)[:4])}, ...)")
    raise ConfigError(f"no run id {where} begins {selector!r}: {fix}")


def not_a_mapping_run(client, run_id: str) -> str | None:
    """Why ``run_id`` cannot be read as a mapping run (a run of run.py that finished), in words, or
    None: it failed or is still running (with its error), or it is a study, sweep parent, report,
    comparison or similarity run."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None  # the caller's own lookup says the run is unknown
    if run.info.lifecycle_stage == "deleted":
        return (f"run {run_id} was deleted (it is in MLflow's trash): restore it in the UI or with "
                "`mlflow runs restore`, or pass another run")
    role = run.data.tags.get("latentmap.role")
    if role:
        kind = {"parent": "a sweep's parent run", "compare": "a comparison run", "report": "a report run",
                "similarity": "a similarity run", "finetune_study": "a fine-tuning study run",
                "finetune": "a fine-tuning run (finetune.py)"}
        return (f"run {run_id} is {kind.get(role, f'a {role} run')}, not a mapping run: pass runs that run.py "
                "logged (a sweep's jobs are its child runs)")
    if run.info.status != "FINISHED":
        error = run.data.tags.get("error")
        return f"run {run_id} is {run.info.status}" + (f" ({error})" if error else "") + ": pass a finished run"
    return None


def _refuse(client, run_id: str, otherwise: str) -> ConfigError:
    """Why ``run_id`` lacks an artifact: not a finished mapping run, or its artifact folder is gone
    (moved or removed: none of its artifacts is there), else ``otherwise``."""
    return ConfigError(not_a_mapping_run(client, run_id) or _artifacts_gone(client, run_id) or otherwise)


def _artifacts_gone(client, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        location = client.get_run(run_id).info.artifact_uri
        if client.list_artifacts(run_id):
            return None
    except (MlflowException, OSError):
        return None
    return (f"run {run_id} has no artifacts where its store says they are ({location}): the folder was moved or "
            "removed; put it back there, or run it again")


def score_table(client, run_id: str):
    """A run's ``tables/per_image.csv`` (index, label, one column of per-image scores per metric) and
    its tags, or a one-line error for a run that has none."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if why := not_a_mapping_run(client, run_id):  # a run stopped after logging some tables is still not one
        raise ConfigError(why)
    folder = _download_folder(run_id)
    try:
        path = client.download_artifacts(run_id, "tables/per_image.csv", str(folder))
    except (MlflowException, OSError) as error:
        raise _refuse(client, run_id, f"run {run_id} has no tables/per_image.csv: compare needs runs made by run.py "
                      "with per-image scores, which runs of an older latentmap lack: run it again") from error
    return pd.read_csv(path), client.get_run(run_id).data.tags


def map_refit(client, run_id: str) -> str | None:
    """Whether a run's half-samples refitted its 2-D map: its ``map_refit`` tag ("true" or
    "false"), else what its ``tables/metrics.csv`` method column says (a run made before the tag),
    else None."""
    tag = client.get_run(run_id).data.tags.get("map_refit")
    if tag in ("true", "false"):
        return tag
    try:
        values, _ = halves_table(client, run_id)
    except ConfigError:
        return None
    return map_refit_in(values)


def map_refit_in(values) -> str | None:
    """"true" or "false" as a run's ``tables/metrics.csv`` (indexed by metric) says its map metrics'
    intervals were made (their method), or None where it does not say."""
    from latentmap.resampling import MAP_METRICS

    methods = [str(values.loc[m, "method"]) for m in MAP_METRICS if m in values.index and "method" in values]
    if any(m.endswith("the 2-D map refitted on each half-sample") for m in methods):
        return "true"
    if any(m.endswith("the 2-D map held fixed") for m in methods):
        return "false"
    return None


def halves_table(client, run_id: str):
    """A run's ``tables/metrics.csv`` (indexed by metric) and ``tables/halves.csv`` (each metric on
    each half-sample), or a one-line error for a run that has none."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    folder = _download_folder(run_id)
    try:
        values = pd.read_csv(client.download_artifacts(run_id, "tables/metrics.csv", str(folder))).set_index("metric")
        halves = pd.read_csv(client.download_artifacts(run_id, "tables/halves.csv", str(folder)))
    except (MlflowException, OSError) as error:
        bootstrap = client.get_run(run_id).data.params.get("metrics.bootstrap")
        made = (f"it was made with metrics.bootstrap={bootstrap}, which scores no half-sample: run it again with "
                "metrics.bootstrap=30 (the default)" if bootstrap in ("0", "1") else
                "runs made before half-sample intervals lack them: run it again")
        raise _refuse(client, run_id, f"run {run_id} has no tables/halves.csv: compare needs runs scored on "
                      f"half-samples; {made}") from error
    return values, halves
