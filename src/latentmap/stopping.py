"""How a command stops when asked to: Ctrl-C (SIGINT) and SIGTERM end the same way.

SIGTERM is what a scheduler's time limit (SLURM), ``docker stop``, Kubernetes and ``kill`` send.
Python's default for it ends the process on the spot: the MLflow run stayed RUNNING and a cache
entry's staging folder was left behind. :func:`handle_sigterm` makes it raise :class:`Terminated`
in the main process instead, a ``KeyboardInterrupt``, so that every path that cleans up after
Ctrl-C (the run marked KILLED, the staging folder removed) cleans up after it too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_MAIN_PID: int | None = None
_PENDING = False  # a SIGTERM arrived and its Terminated has not been seen to stop anything yet


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as Ctrl-C stops, then exit 143 (128 + 15), as the signal would."""


def _on_sigterm(signum, frame) -> None:
    global _PENDING
    if os.getpid() != _MAIN_PID:  # a forked worker (a pool being shut down): end as Python's default would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _PENDING = True  # if the raise lands in a __del__ or weakref callback, Python prints it and drops it
    raise Terminated()


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` for a SIGTERM whose exception Python dropped: a signal that lands
    while a ``__del__`` or weakref callback runs (matplotlib's, while drawing) is printed as
    "Exception ignored" and the run went on to end FINISHED. Called between a run's stages and
    before it closes FINISHED."""
    if _PENDING:
        raise Terminated()


def _delivered() -> None:
    global _PENDING
    _PENDING = False


def handle_sigterm() -> None:
    """In the main thread, where SIGTERM still has Python's default: raise :class:`Terminated` on it
    (a handler someone else installed, submitit's for one, is left alone)."""
    global _MAIN_PID
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _on_sigterm):
        _MAIN_PID = os.getpid()
        signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """:func:`handle_sigterm` while the block runs, and SIGTERM's handler as it was after it (a
    command called in a process that goes on, such as a test's, leaves nothing behind)."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if previous is not _on_sigterm:  # the outermost command: it starts with no SIGTERM pending
        _delivered()
    handle_sigterm()
    try:
        yield
        raise_if_terminated()  # a SIGTERM dropped after the last check still stops the command
    except Terminated:
        _delivered()
        raise
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_code(stop: KeyboardInterrupt) -> int:
    """The shell's code for what stopped the process: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)


def what(stop: KeyboardInterrupt) -> str:
    """``terminated (SIGTERM)`` or ``interrupted``: the first words of the line a stop prints."""
    return "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"


def command(main, name: str):
    """Run an argparse command's ``main()``: SIGTERM handled as Ctrl-C, and either one ends in a
    line and exit 130 or 143, not a traceback (a run the command was logging is closed KILLED by its
    own ``finally``)."""
    import sys

    try:
        with sigterm_as_interrupt():
            return main()
    except KeyboardInterrupt as stop:
        print(f"{what(stop)}: {name} stopped before it finished", file=sys.stderr)
        raise SystemExit(exit_code(stop)) from None
