"""``resume=true``: a job whose config already has a FINISHED run is skipped. A run is matched by
the hash of its resolved config without the keys that do not change results."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latentmap.tracking.store import check_reachable, connect

# Keys that do not change a run's results: left out of the config hash that resume=true matches.
RESUME_IGNORES = ("device", "batch_size", "num_workers", "reuse_freed_memory", "resume", "output_dir", "cache_dir",
                  "tracking", "optimized_metric")


def config_hash(cfg: DictConfig, inputs: dict[str, str] | None = None) -> str:
    """sha256 of the resolved config without :data:`RESUME_IGNORES` (tag ``latentmap.config_hash``), and
    of ``inputs``: fingerprints of files the config names by path only (a fine-tuning study's
    checkpoint, :func:`latentmap.task.run_digest`)."""
    import hashlib

    resolved = OmegaConf.to_container(cfg, resolve=True)
    kept = {key: value for key, value in resolved.items() if key not in RESUME_IGNORES}
    kept.update(inputs or {})
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:24]


def finished_run_with(cfg: DictConfig, digest: str) -> Any:
    """The latest FINISHED run of the experiment tagged with config hash ``digest``, or None."""
    check_reachable(str(cfg.tracking.uri))
    client, experiment_id = connect(cfg.tracking)
    runs = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
                              filter_string="attributes.status = 'FINISHED' and "
                                            f"tags.`latentmap.config_hash` = '{digest}'")
    return runs[0] if runs else None
