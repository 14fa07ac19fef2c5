"""Failpoints for the fault-injection tests: with ``LATENTMAP_FAULT=<name>`` in the environment,
the process kills itself with SIGKILL when it reaches point ``<name>`` (no cleanup code runs, as
with an OOM kill or a node failure). Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    if os.environ.get("LATENTMAP_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
