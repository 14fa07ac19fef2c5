"""latentmap's entry point: `python run.py [overrides]`, or `python run.py -m ...` for a sweep."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from latentmap.errors import ConfigError

log = logging.getLogger("latentmap")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.utils import get_method

    try:
        scores = get_method(cfg.task)(cfg)
    except ConfigError as error:
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        log.warning("interrupted: the MLflow run is marked KILLED and no partial cache entry was kept")
        sys.exit(130)
    return scores.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
