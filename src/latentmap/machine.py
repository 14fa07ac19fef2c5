"""What this process may use of the machine: its CPU cores and this user's cache folder."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one, as under a
    cluster scheduler or ``taskset``; else every core), at least 1: how many threads or worker
    processes latentmap starts side by side."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def user_cache() -> Path:
    """This user's cache folder for latentmap: ``$XDG_CACHE_HOME/latentmap``, or
    ``~/.cache/latentmap`` where that is unset or relative (the XDG spec says to ignore a relative
    one). What a machine keeps across runs and clones, not a run's ``cache_dir``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "latentmap"
