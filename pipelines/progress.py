"""Progress of long work (predict, evaluate, heatmaps): count, throughput, ETA, readable in a terminal and in a log.

Why not Ray Data's own progress bars: they show one bar per operator (listing, decoding,
scoring, writing) in blocks and rows of each, redrawn with escape codes, and the training
loop turns them off (``pipelines.local_ray.quiet_ray_data``) because they drown the epoch
lines. What a user waiting for ``msmae predict`` wants is one number: how many of their
images are done, how fast, and when it ends. So callers count rows where the results come
back (the driver's consuming loop, or the scoring actors' counter in ``pipelines.serve.job_progress``)
and feed a ``Progress``.

On a terminal that is one tqdm bar, redrawn in place. Anywhere else (a log file, CI, a test's
captured output) it is plain lines, no carriage returns or escape codes, at a modest rate: one
when another tenth of the total is done, or after ``every_s`` seconds without a line, never
more often than every ``min_gap_s`` seconds, and always one at the end. ``MSMAE_PROGRESS``
forces a style: ``bar``, ``lines`` or ``off``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable, TextIO

STYLES = ("bar", "lines", "off")
BAR_UNITS = {"images": "img", "files": "file"}  # tqdm's rate reads "img/s"


def format_duration(seconds: float) -> str:
    """``mm:ss``, or ``h:mm:ss`` from an hour on (``--:--`` when unknown)."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "--:--"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def style_for(stream: TextIO) -> str:
    """``MSMAE_PROGRESS`` if set, else a bar on a terminal and plain lines elsewhere."""
    forced = os.environ.get("MSMAE_PROGRESS", "").strip().lower()
    if forced in STYLES:
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "lines"


class Progress:
    """Counts ``done`` of ``total`` (``None``: not known yet) and reports them; thread-safe.

    ``stream`` defaults to ``sys.stdout`` as it is when the progress starts (a test runner's
    capture included). ``clock`` is the time source (``time.monotonic``), a parameter so a test
    can step it.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "images", stream: TextIO | None = None,
                 every_s: float = 30.0, min_gap_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 style: str | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.stream = stream if stream is not None else sys.stdout
        self.every_s, self.min_gap_s, self.clock = every_s, min_gap_s, clock
        self.style = style or style_for(self.stream)
        self.done = 0
        self.start = clock()
        self._last_line = self.start
        self._last_tenth = 0
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if self.style == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=BAR_UNITS.get(unit, unit), file=self.stream, mininterval=0.5,
                             dynamic_ncols=True, leave=True)

    def set_total(self, total: int) -> None:
        """The total, once it is known (a folder counted while the work runs)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def update(self, n: int) -> None:
        """``n`` more done."""
        self.update_to(self.done + n)

    def update_to(self, done: int) -> None:
        """``done`` in all (a counter polled from elsewhere); never goes back."""
        with self._lock:
            if self._closed or done <= self.done:
                return
            step, self.done = done - self.done, done
            if self._bar is not None:
                self._bar.update(step)
            elif self.style == "lines":
                self._maybe_line()

    def close(self) -> None:
        """The last line: how many, how long, how fast."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif self.style == "lines":
                elapsed = self.clock() - self.start
                self._write(f"{self.desc}: {self.done} {self.unit} in {format_duration(elapsed)} ({self._rate(elapsed):.1f} {self.unit}/s)")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def line(self) -> str:
        """The current state as one line: ``desc: done/total (pct) · rate · ETA``."""
        elapsed = self.clock() - self.start
        rate = self._rate(elapsed)
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / self.total:.0%}) · "
                    f"{rate:.1f} {self.unit}/s · ETA {format_duration(left)}")
        return f"{self.desc}: {self.done} {self.unit} · {rate:.1f} {self.unit}/s · {format_duration(elapsed)} so far"

    def _rate(self, elapsed: float) -> float:
        return self.done / elapsed if elapsed > 0 else 0.0

    def _maybe_line(self) -> None:
        now = self.clock()
        if now - self._last_line < self.min_gap_s or (self.total is not None and self.done >= self.total):
            return  # too soon, or finished (close says so)
        tenth = int(10 * self.done / self.total) if self.total else self._last_tenth
        if tenth > self._last_tenth or now - self._last_line >= self.every_s:
            self._last_tenth, self._last_line = tenth, now
            self._write(self.line())

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
