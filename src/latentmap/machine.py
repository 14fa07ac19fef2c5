"""What this process may use of the machine."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the system has one, as under a
    cluster scheduler or ``taskset``; else every core), at least 1: how many threads or worker
    processes latentmap starts side by side."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
