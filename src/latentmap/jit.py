"""numba's compiled code for UMAP and pynndescent, cached on disk and shared by every job.

UMAP and pynndescent compile their numba functions the first time they run, in every new process:
at ``import umap`` and again at the first fit, tens of seconds on a laptop's cores, paid again by
each job of a sweep. numba can keep what it compiled in files (``cache=True``), but pynndescent asks
for that on only some of its functions and UMAP on one. :func:`enable` turns numba's own cache on
for the rest (``Dispatcher.enable_caching``, what ``cache=True`` does), so the second process loads
machine code instead of compiling it: its first UMAP of 2,000 points takes about as long as the
first process's second one (``scripts/bench.py --only jit``).

The files go in this user's cache, ``~/.cache/latentmap/numba`` (:func:`machine_folder`; under
``$XDG_CACHE_HOME`` when set), so every run on the machine after its first loads them, whatever its
``output_dir`` or ``cache_dir``: compiled code belongs to the machine and the installed libraries,
not to a project. Where that folder cannot be written, they go under ``<cache_dir>/numba``, beside
the embeddings. numba writes each file atomically, so concurrent jobs are safe, and checks each
entry against its function's own source file and the CPU; not against the files of the functions it
calls, so after upgrading UMAP or pynndescent alone, delete the folder. A ``NUMBA_CACHE_DIR`` the
user set is kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("umap", "pynndescent")
_enabled: set[int] = set()  # ids of the dispatchers whose caching is on
_compiled_from: dict[int, list] = {}  # id of a Python function -> the dispatchers enable found compiling it
_scanned: dict[str, tuple[int, int]] = {}  # module name -> (id, number of names) when enable last read it
_chosen: list[str] = []  # the folder cache_in set, when it set NUMBA_CACHE_DIR (not the user)


def machine_folder(fallback: str | os.PathLike, name: str = "numba") -> Path:
    """Where a run keeps numba's compiled code: ``name`` in this user's cache
    (:func:`latentmap.machine.user_cache`), shared by every run on the machine, or ``fallback``
    (a run's ``<cache_dir>/numba``) where that folder cannot be made or written."""
    from latentmap.machine import user_cache

    try:
        folder = user_cache() / name
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    except (OSError, RuntimeError):  # no home folder, or one that cannot be written
        pass
    return Path(fallback)


def cache_for_runs(cache_dir: str | os.PathLike) -> None:
    """What a run does (:func:`latentmap.task.tracked_task`): numba's compiled code in
    :func:`machine_folder` (falling back to ``<cache_dir>/numba``), unless the user set
    ``NUMBA_CACHE_DIR``, in which case nothing is made or changed."""
    if not _set_by_user():
        cache_in(machine_folder(Path(cache_dir) / "numba"))


def _set_by_user() -> bool:
    """Whether ``NUMBA_CACHE_DIR`` holds a folder the user chose (not one :func:`cache_in` set)."""
    current = os.environ.get("NUMBA_CACHE_DIR")
    return bool(current) and current not in _chosen


def cache_in(folder: str | os.PathLike) -> None:
    """Keep numba's compiled code under ``folder``, unless the user set ``NUMBA_CACHE_DIR``. Call it
    before UMAP or pynndescent is imported, as :func:`latentmap.task.tracked_task` does: the
    functions they cache themselves choose their folder when they are imported."""
    if _set_by_user():
        return
    folder = str(Path(folder).resolve())
    _chosen.append(folder)
    os.environ["NUMBA_CACHE_DIR"] = folder
    if "numba" in sys.modules:  # read at import; later functions look it up when caching is enabled
        sys.modules["numba"].config.CACHE_DIR = folder


def enable(packages: tuple[str, ...] = PACKAGES) -> int:
    """Turn numba's disk cache on for every compiled function of the modules of ``packages`` (UMAP
    and pynndescent) imported so far, but a parallel variant of a function also compiled serially
    (:func:`_shares_entries`); returns how many were turned on now. Call it after importing
    them and before their first use in a process: code compiled before it is not saved."""
    if not os.environ.get("NUMBA_CACHE_DIR"):
        return 0  # no folder chosen: numba would write beside the installed library
    from numba.core.registry import CPUDispatcher

    found = []
    for name, module in list(sys.modules.items()):
        if module is None or name.split(".")[0] not in packages:
            continue
        names = vars(module)
        if _scanned.get(name) == (id(module), len(names)):  # read before and nothing added since: every
            continue  # run's 30 half-sample refits call this (it read a few thousand names each time)
        _scanned[name] = (id(module), len(names))
        for value in list(names.values()):
            if isinstance(value, CPUDispatcher) and id(value) not in _enabled:
                _enabled.add(id(value))
                _compiled_from.setdefault(id(value.py_func), []).append(value)
                found.append(value)
    count = 0
    for value in found:
        if type(value._cache).__name__ == "NullCache" and not _shares_entries(value):  # not cache=True already
            value.enable_caching()
            count += 1
    # A function numba cannot cache (pynndescent's nn_descent holds dynamic globals) still runs,
    # compiled in memory as before: no warning for it (numba's message starts with terminal colours).
    from numba import NumbaWarning

    warnings.filterwarnings("ignore", message=r".*Cannot cache compiled function", category=NumbaWarning)
    if count:
        log.debug("numba: disk cache on for %d functions", count)
    return count


def _shares_entries(dispatcher) -> bool:
    """Whether ``dispatcher`` would share numba's cache entries with another compiled variant of its
    function: numba keys a cached function by its name and bytecode, not by its options, so
    umap-learn's serial and parallel layout epochs (one Python function compiled twice) would load
    each other's machine code (a seeded run the parallel loop, an unseeded run the one-thread loop,
    whichever was saved last). Of such a group only its one serial variant is cached (a seeded run's,
    latentmap's default); the others compile in memory, as without :func:`enable`."""
    group = _compiled_from.get(id(dispatcher.py_func), [])
    if len(group) < 2:
        return False
    serial = [other for other in group if not other.targetoptions.get("parallel")]
    return not (len(serial) == 1 and serial[0] is dispatcher)


@contextlib.contextmanager
def cached_runtime_jit(modules: tuple[str, ...] = ("umap",)):
    """While open, ``numba.njit(function, **options)`` called at run time returns one dispatcher per
    function and options with numba's disk cache on (a serial one's: a ``parallel`` variant compiles
    in memory, since it would share the serial one's entries, see :func:`_shares_entries`).
    AlignedUMAP's layout (``umap.layouts``) compiles its epoch function that way inside every call,
    a new dispatcher each time, so every fine-tuning study compiled it again; with this, a later
    process loads it from the disk cache (AlignedUMAP of 2 x 100 images in a fresh process took 2.5
    times as long without it, the same embedding). Only functions of ``modules`` are caught (numba
    compiles helpers of its own through njit); decorator uses and calls with ``cache=`` go to numba
    unchanged."""
    import numba

    original = _numba_njit()
    if not os.environ.get("NUMBA_CACHE_DIR"):
        yield
        return

    def njit(*args, **kwargs):
        function = args[0] if len(args) == 1 else None
        if (not callable(function) or "cache" in kwargs or hasattr(function, "py_func")
                or str(getattr(function, "__module__", "")).split(".")[0] not in modules):
            return original(*args, **kwargs)
        key = (args[0], tuple(sorted(kwargs.items())))
        if key not in _RUNTIME:
            _RUNTIME[key] = original(args[0], **kwargs)
            if not kwargs.get("parallel"):  # a parallel variant would share the serial one's entries (_shares_entries)
                _RUNTIME[key].enable_caching()
        return _RUNTIME[key]

    numba.njit = njit
    try:
        yield
    finally:
        numba.njit = original


_RUNTIME: dict = {}  # (function, options) -> its dispatcher, for cached_runtime_jit
_NJIT = None  # numba's own njit, once cached_runtime_jit has run


def _numba_njit():
    global _NJIT
    import numba

    if _NJIT is None:
        _NJIT = numba.njit
    return _NJIT


_RELEASING: dict[int, tuple] = {}  # id of a dispatcher -> (it, its copy that releases the GIL)


def releasing_gil(dispatcher):
    """``dispatcher``'s function compiled again with the same options and ``nogil=True``: the same
    machine code for its body (numba's ``nogil`` only changes the call's wrapper, which lets go of
    Python's lock while the compiled code runs), so two threads can run it at once. One copy a
    dispatcher a process; numba's disk cache is on for it where a folder is chosen (:func:`cache_in`).

    The copy is compiled under its own name (``<name>_nogil``): numba keys its cache files by the
    function's name and bytecode, not by the options, so a copy under the same name would share (and
    could load) the entries of the original's variants. A dispatcher that already releases the GIL, or
    runs in parallel (its own threads), is returned as it is."""
    import types

    import numba

    options = dict(getattr(dispatcher, "targetoptions", {}))
    if options.get("nogil") or options.get("parallel"):
        return dispatcher
    if id(dispatcher) not in _RELEASING:
        function = dispatcher.py_func
        code = function.__code__.replace(co_name=f"{function.__name__}_nogil")
        if hasattr(code, "co_qualname"):  # 3.11 and later
            code = code.replace(co_qualname=f"{function.__qualname__}_nogil")
        copy = types.FunctionType(code, function.__globals__, f"{function.__name__}_nogil", function.__defaults__,
                                  function.__closure__)
        copy.__qualname__ = f"{function.__qualname__}_nogil"
        copy.__module__ = function.__module__
        options.pop("nopython", None)
        released = numba.njit(copy, **{**options, "nogil": True})
        if os.environ.get("NUMBA_CACHE_DIR"):
            released.enable_caching()
        _RELEASING[id(dispatcher)] = (dispatcher, released)  # the original held: its id stays its own
    return _RELEASING[id(dispatcher)][1]
