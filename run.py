"""latentmap's entry point: `python run.py [overrides]`, or `python run.py -m ...` for a sweep."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.utils import get_method

    from latentmap.task import execute

    return execute(get_method(cfg.task), cfg, cfg.get("optimized_metric"))


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from latentmap.config import refuse_unknown_keys

    refuse_unknown_keys(sys.argv[1:], Path(__file__).parent / "conf", "config", "run.py")
    main()
