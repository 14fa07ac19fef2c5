"""latentmap.machine: the cores a process may use, its cache folder, and its allocator's thresholds."""

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


# A child process counts the page faults of eight 64 MiB arrays (each written whole, then freed):
# before the context (glibc's own thresholds), inside it, and after it. numpy is told not to ask for
# huge pages, as torch does not: each block is 16,384 pages of 4 KiB.
_FAULTS = """
import json, resource
import numpy as np
try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:  # numpy 1
    from numpy.core.multiarray import _set_madvise_hugepage
from latentmap import machine

_set_madvise_hugepage(False)

def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        block = np.ones(16 << 20, np.float32)  # 64 MiB, every page written
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start

found = {"before": faults()}
with machine.reuse_freed_memory() as changed:
    found["inside"] = faults()
found["after"], found["changed"] = faults(), changed
print(json.dumps(found))
"""


def _glibc_before_2_35() -> bool:
    import platform

    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) < (2, 35)
    except ValueError:  # a version this parse does not know: try the test
        return False


def _huge_pages_always() -> bool:
    """Whether the kernel backs every large block by 2 MiB pages unasked (then no 4 KiB count holds)."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(machine._glibc() is None, reason="reuse_freed_memory acts on glibc only (Linux's usual C library)")
@pytest.mark.skipif(_huge_pages_always(), reason="this kernel backs every large block by huge pages, unasked")
@pytest.mark.skipif(_glibc_before_2_35(), reason="glibc before 2.35 keeps no block above 32 MiB in the heap")
def test_freed_blocks_are_reused_inside_the_context_and_given_back_after_it():
    """glibc hands a freed 64 MiB block back to the kernel, so the next one faults in its pages
    again; inside the context the heap keeps it and the next one reuses it; after the context the
    memory goes back again."""
    import json

    env = {key: value for key, value in os.environ.items() if not key.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    found = json.loads(subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True,
                                      env=env).stdout)
    assert found["changed"] is True
    pages = 8 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert found["before"] >= 0.9 * pages  # every block's pages faulted in afresh
    assert found["inside"] <= 0.25 * pages  # the first block's pages, then reused
    assert found["after"] >= 0.9 * pages  # given back: the blocks are the kernel's again


class _Recorder:
    """A stand-in for the C library that records latentmap's mallopt and malloc_trim calls; it
    refuses (returns 0 for) the (parameter, value) pairs in ``refuses``, as glibc does a value out
    of its range."""

    def __init__(self, refuses=()):
        self.calls, self.refuses = [], set(refuses)

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 0 if (parameter, value) in self.refuses else 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_thresholds_are_set_inside_and_put_to_glibc_s_ceilings_after_even_on_an_error(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(machine, "_glibc", lambda: libc)
    _unset(monkeypatch)
    with pytest.raises(KeyboardInterrupt), machine.reuse_freed_memory() as changed:
        assert changed is True
        assert libc.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, 2**31 - 1)]
        raise KeyboardInterrupt
    assert libc.calls[2:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("malloc_trim", 0)]


def test_nested_contexts_keep_the_thresholds_until_the_outermost_closes(monkeypatch):
    libc = _Recorder()
    monkeypatch.setattr(machine, "_glibc", lambda: libc)
    _unset(monkeypatch)
    with machine.reuse_freed_memory():
        with machine.reuse_freed_memory() as inner:
            assert inner is True
        assert libc.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, 2**31 - 1)]  # still set
    assert libc.calls[2:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    with machine.reuse_freed_memory():  # a later context sets them again
        assert libc.calls[5:] == [("mallopt", -3, 1 << 30), ("mallopt", -1, 2**31 - 1)]


def _unset(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


def test_glibc_before_2_35_gets_its_largest_threshold_and_a_refusal_changes_nothing(monkeypatch):
    _unset(monkeypatch)
    old = _Recorder(refuses={(-3, 1 << 30)})  # glibc 2.34 and older: at most 32 MiB
    monkeypatch.setattr(machine, "_glibc", lambda: old)
    with machine.reuse_freed_memory() as changed:
        assert changed is True
    assert old.calls[:3] == [("mallopt", -3, 1 << 30), ("mallopt", -3, 32 << 20), ("mallopt", -1, 2**31 - 1)]
    assert old.calls[3:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("malloc_trim", 0)]
    refusing = _Recorder(refuses={(-3, 1 << 30), (-3, 32 << 20)})  # no mmap threshold: no trim threshold either
    monkeypatch.setattr(machine, "_glibc", lambda: refusing)
    with machine.reuse_freed_memory() as changed:
        assert changed is False
    assert [call for call in refusing.calls if call[1] == -1 or call[0] == "malloc_trim"] == []
    no_trim = _Recorder(refuses={(-1, 2**31 - 1)})  # the trim threshold refused: the mmap threshold put back
    monkeypatch.setattr(machine, "_glibc", lambda: no_trim)
    with machine.reuse_freed_memory() as changed:
        assert changed is False
    assert no_trim.calls == [("mallopt", -3, 1 << 30), ("mallopt", -1, 2**31 - 1), ("mallopt", -3, 32 << 20)]
    assert machine._OPEN == [0]


def test_switched_off_nothing_changes(monkeypatch):
    _unset(monkeypatch)
    libc = _Recorder()
    monkeypatch.setattr(machine, "_glibc", lambda: libc)
    with machine.reuse_freed_memory(False) as changed:
        assert changed is False
    assert libc.calls == []


@pytest.mark.parametrize("variable, value", [("MALLOC_MMAP_THRESHOLD_", "131072"), ("MALLOC_TRIM_THRESHOLD_", "131072"),
                                             ("MALLOC_TOP_PAD_", "131072"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")])
def test_a_user_s_own_glibc_settings_stand(monkeypatch, variable, value):
    _unset(monkeypatch)
    libc = _Recorder()
    monkeypatch.setattr(machine, "_glibc", lambda: libc)
    monkeypatch.setenv(variable, value)
    with machine.reuse_freed_memory() as changed:
        assert changed is False
    assert libc.calls == []


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(machine, "_glibc", lambda: None)
    with machine.reuse_freed_memory() as changed:
        assert changed is False
