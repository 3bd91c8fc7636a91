"""pipelines.progress: the lines a user reads while predict / evaluate run, in a log (no terminal) and on a terminal."""

from __future__ import annotations

import io

import pytest

from pipelines.progress import Progress, format_duration, style_for


class Clock:
    """A time source the test steps (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_format_duration_is_mm_ss_then_h_mm_ss():
    assert format_duration(0) == "00:00"
    assert format_duration(75.4) == "01:15"
    assert format_duration(3600 + 62) == "1:01:02"
    assert format_duration(float("nan")) == "--:--"


def test_a_log_gets_plain_lines_each_tenth_with_rate_and_eta_and_a_closing_line(monkeypatch):
    monkeypatch.delenv("MSMAE_PROGRESS", raising=False)
    out, clock = io.StringIO(), Clock()
    assert style_for(out) == "lines"  # not a terminal
    with Progress("predict", total=1000, unit="files", stream=out, clock=clock) as progress:
        for _ in range(100):  # 10 files a second for 100 s
            clock.now += 1.0
            progress.update(10)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "predict: 100/1000 files (10%) · 10.0 files/s · ETA 01:30"
    assert len(lines) == 10  # 10 %, 20 %, ..., 90 %, then the closing line (not one per update)
    assert lines[-1] == "predict: 1000 files in 01:40 (10.0 files/s)"


def test_lines_are_spaced_out_and_an_unknown_total_still_reports_every_so_often(monkeypatch):
    monkeypatch.delenv("MSMAE_PROGRESS", raising=False)
    out, clock = io.StringIO(), Clock()
    progress = Progress("evaluate val", total=None, stream=out, clock=clock, every_s=30.0)
    for _ in range(65):  # one image a second, total unknown: a line after 30 s and after 60 s, no more
        clock.now += 1.0
        progress.update(1)
    assert out.getvalue().splitlines() == ["evaluate val: 30 images · 1.0 images/s · 00:30 so far",
                                           "evaluate val: 60 images · 1.0 images/s · 01:00 so far"]
    progress.set_total(100)  # known later: the next line has the ETA
    clock.now += 40.0
    progress.update_to(80)
    assert out.getvalue().splitlines()[-1] == "evaluate val: 80/100 images (80%) · 0.8 images/s · ETA 00:26"
    progress.update_to(70)  # a polled counter never goes back
    assert progress.done == 80


def test_many_quick_updates_print_at_most_one_line_per_min_gap(monkeypatch):
    monkeypatch.delenv("MSMAE_PROGRESS", raising=False)
    out, clock = io.StringIO(), Clock()
    progress = Progress("predict", total=100, stream=out, clock=clock, min_gap_s=2.0)
    for _ in range(99):  # every tenth crossed within one second: nothing is printed yet
        clock.now += 0.01
        progress.update(1)
    assert out.getvalue() == ""
    progress.close()
    assert out.getvalue().splitlines() == ["predict: 99 images in 00:01 (100.0 images/s)"]


@pytest.mark.parametrize("forced,expected", [("off", ""), ("lines", "predict: 5 images in")])
def test_msmae_progress_forces_a_style(monkeypatch, forced, expected):
    monkeypatch.setenv("MSMAE_PROGRESS", forced)
    out = io.StringIO()
    with Progress("predict", total=5, stream=out) as progress:
        progress.update(5)
    assert out.getvalue().startswith(expected) and (forced != "off" or out.getvalue() == "")


def test_a_terminal_gets_one_tqdm_bar_with_rate(monkeypatch):
    monkeypatch.delenv("MSMAE_PROGRESS", raising=False)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert style_for(out) == "bar"
    with Progress("predict", total=4, unit="files", stream=out) as progress:
        progress.update(4)
    assert "predict: 100%" in out.getvalue() and "4/4" in out.getvalue() and "file/s" in out.getvalue()
