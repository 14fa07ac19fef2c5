"""latentmap's entry point: `python run.py [overrides]`, or `python run.py -m ...` for a sweep."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from latentmap.errors import ConfigError

log = logging.getLogger("latentmap")


def _sweep_job():
    """(sweep folder, job number) when this is a job of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().sweep.dir, HydraConfig.get().job.num
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.utils import get_method

    try:
        scores = get_method(cfg.task)(cfg)
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
        from latentmap.tracking import mark_job_failed

        mark_job_failed(*sweep, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        return None
    except KeyboardInterrupt:
        log.warning("interrupted: the MLflow run is marked KILLED and no partial cache entry was kept")
        sys.exit(130)
    return scores.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
