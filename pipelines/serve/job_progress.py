"""Progress of a Ray Data job that the driver does not consume row by row (``msmae predict``'s ``write_parquet``).

The scoring actors add each finished batch's row count to a ``RowCounter`` actor (fire and
forget: a scorer never waits for it); a thread on the driver polls the counter once a second
into a ``pipelines.progress.Progress``. The total is counted on the driver in that same thread
first (a walk of directory entries, far faster than scoring), so the ETA appears once the
folder is counted and the count never holds up the job.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import ray

from pipelines.progress import Progress


@ray.remote(num_cpus=0)
class RowCounter:
    """Rows finished so far, summed over every actor that reports."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += int(rows)

    def get(self) -> int:
        return self.rows


@contextlib.contextmanager
def watched(progress: Progress, counter, count_total: Callable[[], int] | None = None, poll_s: float = 1.0) -> Iterator[None]:
    """While the block runs: ``count_total()`` (if given) sets the total, then ``counter`` is polled into ``progress``.
    On leaving, one last poll and the progress's closing line."""
    stop = threading.Event()

    def poll() -> None:
        if count_total is not None:
            try:
                progress.set_total(count_total())
            except OSError:
                pass  # the job's own listing reports what cannot be read; progress goes on without an ETA
        while not stop.wait(poll_s):
            with contextlib.suppress(Exception):  # a slow or lost counter costs a progress line, never the job
                progress.update_to(ray.get(counter.get.remote(), timeout=poll_s * 5))

    thread = threading.Thread(target=poll, name="msmae-progress", daemon=True)
    thread.start()
    try:
        yield
        with contextlib.suppress(Exception):
            progress.update_to(ray.get(counter.get.remote(), timeout=30))
    finally:
        stop.set()
        thread.join(timeout=10)
        progress.close()
        with contextlib.suppress(Exception):
            ray.kill(counter)
