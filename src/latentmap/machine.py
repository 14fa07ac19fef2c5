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


def forks_by_default() -> bool:
    """Whether this process starts new processes by fork: the method set for it, else the platform's
    default (the first listed), read without fixing it as ``get_start_method()`` would. Fork on Linux
    before Python 3.14; spawn on macOS and Windows, forkserver on Linux from 3.14. latentmap starts
    worker processes on its own only where they fork: a forked worker shares the parent's model and
    index instead of receiving a pickled copy."""
    import multiprocessing

    return (multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]) == "fork"


def user_cache() -> Path:
    """This user's cache folder for latentmap: ``$XDG_CACHE_HOME/latentmap``, or
    ``~/.cache/latentmap`` where that is unset or relative (the XDG spec says to ignore a relative
    one). What a machine keeps across runs and clones, not a run's ``cache_dir``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache") / "latentmap"
