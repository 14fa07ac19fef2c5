"""The config edge: run-level key checks, instantiating a `_target_` node, and a job's folders.

Every entry point (``run.py``, ``scripts/finetune.py``, ``scripts/similarity.py``, the fine-tuning
study) uses these through :func:`latentmap.task.tracked_task`, so a bad value reads the same
everywhere: one line naming the key, the bad value and the fix.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from latentmap.errors import ConfigError, require_int

PRECISIONS = ("fp32", "bf16", "fp16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# plots.<key>: (smallest valid value, an example for the message)
_PLOT_INTS = {"max_thumbnails": (0, 400), "grid_images": (0, 40), "dpi": (1, 120), "neighbours": (1, 8),
              "neighbour_queries": (0, 6), "outliers": (0, 16), "map_max_points": (2, 1000000),
              "map_thumbnails": (0, 20000)}


def output_dirs(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(artifact folder, Hydra's .hydra folder) of this job; outside Hydra, a timestamped folder
    under ``output_dir`` and no .hydra folder."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        job_dir = Path(HydraConfig.get().runtime.output_dir)
        return job_dir / "artifacts", job_dir / ".hydra"
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    return Path(cfg.output_dir) / "runs" / stamp / "artifacts", None


def instantiate_node(node: DictConfig, group: str) -> Any:
    """``hydra.utils.instantiate(node)``, with a failure turned into one ConfigError line naming
    the group and its ``_target_``."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        first_line = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"{group} ({node.get('_target_')}): {first_line}") from error


def check_precision(precision: Any) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not a precision: choose one of {', '.join(PRECISIONS)}")


def check_run_keys(cfg: DictConfig) -> None:
    """Run-level keys, checked before any work: one clear line for a bad value. Keys a config does
    not have (the fine-tuning config has no ``plots``) are not checked."""
    require_int("seed", cfg.seed, 0, "seed=42")
    for key in ("data_seed", "reducer_seed", "cv_seed"):
        if key in cfg:
            require_int(key, cfg[key], 0, f"{key}=42 (or leave it out: it follows seed)")
    require_int("batch_size", cfg.batch_size, 1, "batch_size=64")
    require_int("num_workers", cfg.num_workers, 0, "num_workers=4")
    if not isinstance(cfg.device, str) or not _DEVICE.match(cfg.device):
        raise ConfigError(f"device={cfg.device!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps")
    check_precision(cfg.get("precision", "fp32"))
    if "study" in cfg:  # the similarity panel's images, permutations, resamples and k
        for key, minimum, example in (("max_images", 8, 1000), ("null_images", 8, 500), ("permutations", 0, 200),
                                      ("bootstrap", 0, 100), ("k", 1, 10)):
            require_int(f"study.{key}", cfg.study[key], minimum, f"study.{key}={example}")
    if "plots" in cfg:
        for key, (minimum, example) in _PLOT_INTS.items():
            require_int(f"plots.{key}", cfg.plots[key], minimum, f"plots.{key}={example}")
        budget = cfg.plots.get("map_max_mb", 60)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 10:
            raise ConfigError(f"plots.map_max_mb={budget!r} must be a number of megabytes >= 10 (Plotly's "
                              "JavaScript alone is 5): e.g. plots.map_max_mb=60")
