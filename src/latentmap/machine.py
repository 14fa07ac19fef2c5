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
# Blocks below this stay in the heap: every activation of a CPU forward pass at the usual batch
# sizes (1 GiB; glibc before 2.35 refuses more than 32 MiB, HEAP_MAX_SIZE / 2, and gets that).
KEEP_BLOCKS_BELOW = (1 << 30, 32 << 20)
KEEP_FREE_TOP_BELOW = (1 << 31) - 1  # the largest value mallopt takes (a C int)
# What reuse_freed_memory leaves behind: the ceiling glibc's own (dynamic) thresholds rise to as a
# process frees large blocks (32 MiB on 64-bit systems, the trim threshold twice that).
AFTER_MMAP_THRESHOLD, AFTER_TRIM_THRESHOLD = 32 << 20, 64 << 20
_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


@functools.cache
def _glibc():
    """The C library as ctypes sees it, where it is glibc (mallopt and malloc_trim as documented
    there), else None (macOS, Windows, musl, or anything that fails the lookup). Looked up once a
    process."""
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            return None
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except Exception:  # no ctypes, an unreadable interpreter binary, no libc.so.6: leave the allocator be
        return None


def _user_set_allocator() -> bool:
    """Whether the user set glibc's malloc options themselves: its ``MALLOC_*_`` variables, or
    ``glibc.malloc.*`` tunables in ``GLIBC_TUNABLES``."""
    return any(name in os.environ for name in _ALLOCATOR_VARIABLES) or \
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


_OPEN = [0]  # reuse_freed_memory contexts that changed the thresholds, open in this process
_OPEN_LOCK = threading.Lock()


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While open, freed memory stays with this process for its next allocation instead of going
    back to the kernel; on leaving, what is free goes back (``malloc_trim``). Yields whether it
    changed anything. Contexts may nest (or open in several threads): the outermost sets the
    thresholds, and they stay until the last one closes.

    A CPU forward pass allocates and frees each layer's activations, tens to hundreds of MB a batch.
    glibc's malloc serves blocks that large by ``mmap`` and unmaps them on free, so every page of
    every activation starts as a page fault the kernel must zero: EfficientNet-Lite0 at batch 64
    spent more of its time in the kernel than in the model here. Keeping blocks below 1 GiB in the
    heap made CPU extraction 1.2-2.2x faster (ViT-B/16, ResNet-50, EfficientNet-Lite0, MobileNetV2;
    the same features, bit for bit), for 0.5-1.0 GB more peak memory at batch 64 while it runs
    (``python scripts/bench.py --only allocator``, docs/performance.md).

    Nothing changes where ``enabled`` is false (the ``reuse_freed_memory`` setting, or a GPU run),
    where the C library is not glibc, where the user set glibc's own malloc options
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, or
    ``glibc.malloc.*`` in ``GLIBC_TUNABLES``), or where glibc refuses the thresholds. Leaving sets
    them to the ceilings glibc's own adjustment reaches (32 MiB and 64 MiB), since mallopt cannot
    give that adjustment back. glibc's manual marks mallopt unsafe beside other threads' frees:
    latentmap opens this just before a model's loop starts, when no other thread of its own is
    allocating (torch's compute threads wait between operations)."""
    libc = _glibc() if enabled else None
    if libc is None or _user_set_allocator():
        yield False
        return
    with _OPEN_LOCK:
        if _OPEN[0] == 0:
            # the trim threshold only once the mmap threshold took: alone it would freeze glibc's
            # adjustment wherever it stood
            kept = any(libc.mallopt(M_MMAP_THRESHOLD, below) == 1 for below in KEEP_BLOCKS_BELOW)
            if not kept or libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_TOP_BELOW) != 1:
                if kept:  # put the mmap threshold where leaving would
                    libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                kept = False
        else:
            kept = True
        if kept:
            _OPEN[0] += 1
    if not kept:
        yield False
        return
    try:
        yield True
    finally:
        with _OPEN_LOCK:
            _OPEN[0] -= 1
            if _OPEN[0] == 0:
                libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
                libc.malloc_trim(0)
