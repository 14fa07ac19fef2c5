"""latentmap.machine: the cores a process may use."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from latentmap import machine

from helpers import ROOT


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this system")
def test_usable_cores_follow_the_process_affinity_not_the_machine_s_count():
    """Pinned to one core (taskset's way, in a child process), latentmap counts one core, though the
    machine has more; unpinned, it counts the affinity's cores."""
    assert machine.usable_cores() == len(os.sched_getaffinity(0)) >= 1
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from latentmap import machine; print(machine.usable_cores())")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # this checkout's latentmap
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert pinned.stdout.strip() == "1"


def test_without_affinity_every_core_counts_and_never_zero(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert machine.usable_cores() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # what os.cpu_count returns when it cannot tell
    assert machine.usable_cores() == 1


def test_the_user_cache_follows_an_absolute_xdg_cache_home_and_ignores_a_relative_one(monkeypatch, tmp_path):
    from pathlib import Path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert machine.user_cache() == tmp_path / "latentmap"
    for ignored in ("relative/cache", ""):  # the XDG spec: a relative path is invalid; empty is unset
        monkeypatch.setenv("XDG_CACHE_HOME", ignored)
        assert machine.user_cache() == Path.home() / ".cache" / "latentmap"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert machine.user_cache() == Path.home() / ".cache" / "latentmap"
