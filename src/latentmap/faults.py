"""Failpoints for the fault-injection tests: with ``LATENTMAP_FAULT=<name>`` in the environment,
the process kills itself with SIGKILL when it reaches point ``<name>`` (no cleanup code runs, as
with an OOM kill or a node failure); with ``LATENTMAP_FAULT=<name>:INT`` it sends itself SIGINT
there instead (Ctrl-C at exactly that point). Unset, a point costs one dictionary lookup."""

from __future__ import annotations

import os
import signal


def point(name: str) -> None:
    fault = os.environ.get("LATENTMAP_FAULT")
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"{name}:INT":
        # Ctrl-C in a terminal: Python's own SIGINT handler, even where this process inherited SIGINT
        # ignored (a job started in the background by a shell without job control).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.kill(os.getpid(), signal.SIGINT)
    elif fault == f"{name}:TERM":  # a scheduler's time limit, `docker stop`, `kill`
        os.kill(os.getpid(), signal.SIGTERM)
