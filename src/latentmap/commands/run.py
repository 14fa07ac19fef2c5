"""``latentmap`` (installed) and ``python run.py``: one mapping run, or a sweep with ``-m``.

A key the config does not define is refused in one line before Hydra composes anything; then
Hydra composes ``conf/config.yaml`` with the command line's overrides and runs ``cfg.task``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from latentmap.config import CONF_DIR, hydra_command


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def run(cfg: DictConfig) -> float | None:
    from hydra.utils import get_method

    from latentmap.task import execute

    return execute(get_method(cfg.task), cfg, cfg.get("optimized_metric"))


def main() -> None:
    hydra_command(run, "config", "run.py")


if __name__ == "__main__":
    main()
