"""Progress on the terminal for the stages that take more than a few seconds.

:func:`working` shows ``fitting UMAP on 1,797 x 1,280: 00:12`` on stderr, ticking each second, while
a block without countable steps runs (a reducer's fit, the metric stage); :func:`steps` is a bar
over countable steps (the blocks of a similarity panel). Both draw only on a terminal (tqdm's
``disable=None``): a log file or a CI log gets the log lines and the closing stage times instead.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def working(description: str) -> Iterator[None]:
    """A line on stderr, ``<description>: <elapsed>``, redrawn each second until the block ends."""
    from tqdm.auto import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc}: {elapsed}", disable=None, leave=False,
               file=sys.stderr)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True, name="latentmap-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def steps(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterable[T]:
    """``items`` with a progress bar on stderr (a terminal only)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, total=total, unit=unit, disable=None, leave=False, file=sys.stderr)
