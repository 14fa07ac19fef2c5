"""The terminal's progress lines: a ticking elapsed time for a stage without steps, a bar over
steps, and nothing at all when stderr is not a terminal (a log file or CI)."""

from __future__ import annotations

import io
import time

from latentmap import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_long_stage_ticks_its_elapsed_time_on_a_terminal(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    with progress.working("fitting UMAP on 1,797 x 1,280"):
        time.sleep(1.3)
    drawn = screen.getvalue().split("\r")
    assert "fitting UMAP on 1,797 x 1,280: 00:00" in drawn and "fitting UMAP on 1,797 x 1,280: 00:01" in drawn


def test_steps_draw_a_bar_on_a_terminal_and_nothing_in_a_log(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr("sys.stderr", screen)
    assert list(progress.steps(range(3), "panel", unit="block")) == [0, 1, 2]
    assert "panel:   0%" in screen.getvalue() and "0/3 [00:00<?, ?block/s]" in screen.getvalue()
    log = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", log)
    with progress.working("metrics"):
        assert list(progress.steps(range(3), "panel")) == [0, 1, 2]
    assert log.getvalue() == ""
