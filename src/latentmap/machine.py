"""What this process may use of the machine: its CPU cores, this user's cache folder, and how its
memory allocator treats the blocks a model's forward pass frees."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


# glibc's mallopt parameters (malloc.h) and what reuse_freed_memory sets them to. Blocks above the
# mmap threshold come from the kernel and go back to it on free; the heap's free top goes back when
# it passes the trim threshold.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BLOCKS_BELOW = 1 << 30  # 1 GiB: every activation of a CPU forward pass at the usual batch sizes
KEEP_FREE_TOP_BELOW = (1 << 31) - 1  # the largest value mallopt takes (a C int)
# What reuse_freed_memory leaves behind: the ceiling glibc's own (dynamic) thresholds rise to as a
# process frees large blocks (32 MiB on 64-bit systems, the trim threshold twice that).
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20
_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def _glibc():
    """The C library as ctypes sees it, where it is glibc (mallopt and malloc_trim as documented
    there), else None (macOS, Windows, musl). Looked up once a process."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_OPEN = [0]  # reuse_freed_memory contexts open in this process: the outermost sets and restores
_OPEN_LOCK = threading.Lock()


@contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """While open, freed memory stays with this process for its next allocation instead of going
    back to the kernel; on leaving, what is free goes back (``malloc_trim``). Yields whether it
    changed anything. Contexts may nest (or open in several threads): the outermost sets the
    thresholds, and they stay until the last one closes.

    A CPU forward pass allocates and frees each layer's activations, tens to hundreds of MB a batch.
    glibc's malloc serves blocks that large by ``mmap`` and unmaps them on free, so every page of
    every activation starts as a page fault the kernel must zero: EfficientNet-Lite0 at batch 64
    spent more of its time in the kernel than in the model here. Keeping blocks below 1 GiB in the
    heap made CPU extraction 1.2-2.1x faster (ViT-B/16, ResNet-50, EfficientNet-Lite0, MobileNetV2;
    the same features, bit for bit), for 0.5-0.9 GB more peak memory at batch 64 while it runs
    (``python scripts/bench.py --only allocator``, docs/performance.md).

    glibc only (Linux's usual C library), and only where the user has not set glibc's own
    ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_TOP_PAD_``: their settings
    stand. Elsewhere it does nothing. Leaving sets the thresholds to the ceilings glibc's own
    adjustment reaches (32 MiB and 64 MiB), since mallopt cannot give that adjustment back."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in _ALLOCATOR_VARIABLES):
        yield False
        return
    with _OPEN_LOCK:
        _OPEN[0] += 1
        if _OPEN[0] == 1:
            libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_BELOW)
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_TOP_BELOW)
    try:
        yield True
    finally:
        with _OPEN_LOCK:
            _OPEN[0] -= 1
            if _OPEN[0] == 0:
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)
