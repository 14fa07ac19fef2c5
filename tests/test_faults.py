"""latentmap.faults: a failpoint does nothing unless LATENTMAP_FAULT names it; then it interrupts
the process there (SIGINT) or kills it (SIGKILL). The runs it stops are checked in test_sweep.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from latentmap import faults


def test_a_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv("LATENTMAP_FAULT", raising=False)
    faults.point("extract")
    monkeypatch.setenv("LATENTMAP_FAULT", "cache-write")
    faults.point("extract")  # another point: nothing


def test_a_named_point_interrupts_as_ctrl_c_does(monkeypatch):
    monkeypatch.setenv("LATENTMAP_FAULT", "extract:INT")
    previous = signal.getsignal(signal.SIGINT)  # the point installs Python's own handler: put it back
    try:
        with pytest.raises(KeyboardInterrupt):
            faults.point("extract")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_named_point_kills_the_process():
    env = {**os.environ, "LATENTMAP_FAULT": "extract"}
    code = "from latentmap import faults; faults.point('extract'); print('went on')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -9 and "went on" not in result.stdout
