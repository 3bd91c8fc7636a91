"""A Ray Data datasource that lists a folder tree in Ray tasks: one row per thing found (path, problem, detail).

Why not ``ray.data.read_binary_files``: its file listing runs on the driver (every path and
size held there), it fails the whole job on a broken symlink, and a FIFO under the folder would
block its read task forever. Here the driver reads only the top level's *names* (one
``os.scandir``, no ``stat``) and cuts them into chunks; each read task stats its chunk and
walks the sub-folders it holds with ``pipelines.data.sources.scan_tree`` (folder links followed,
loop-safe across the whole tree), so listing runs where the cluster's CPUs are and a file that
cannot be read becomes a row with the reason ingest would quarantine it for. Nothing is read
here but directory entries: the bytes are read by whoever decodes them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines.data.images import UNREADABLE
from pipelines.data.sources import LINK_LOOP, NOT_A_FILE, TreeEntry, _unstattable, scan_tree, unstorable_name

LISTING_SCHEMA = pa.schema([("path", pa.string()), ("problem", pa.string()), ("detail", pa.string())])
_ROWS_PER_BLOCK = 1024  # a task walking a huge sub-folder emits bounded blocks, not one giant one


class FolderListing(Datasource):
    """Every entry under ``root`` (recursively): ``path`` (``root/rel``), ``problem`` and ``detail`` (null for a regular file)."""

    def __init__(self, root: Path, names_per_task: int = 256) -> None:
        super().__init__()
        self.root = Path(root).absolute()  # tasks may run in another working directory
        root_stat = os.stat(self.root)  # an unlistable root is an error on the driver, not a row
        self.root_key = (root_stat.st_dev, root_stat.st_ino)
        with os.scandir(self.root) as entries:
            self.names = sorted(e.name for e in entries)
        self.names_per_task = max(1, names_per_task)

    def count(self) -> int:
        """The rows the listing will yield, walked here (directory entries only): ``msmae predict``'s progress total."""
        return sum(len(_entries_of(str(self.root), self.root_key, name)) for name in self.names)

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown until the sub-folders are walked

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        del per_task_row_limit, data_context
        # at least `parallelism` tasks where there are names enough, none with more than names_per_task names
        per_task = max(1, min(self.names_per_task, -(-len(self.names) // max(parallelism, 1))))
        tasks = []
        for start in range(0, len(self.names), per_task):
            chunk = self.names[start:start + per_task]
            root, root_key = str(self.root), self.root_key
            tasks.append(ReadTask(
                lambda chunk=chunk, root=root, root_key=root_key: _list_chunk(root, root_key, chunk),
                BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None),
                schema=LISTING_SCHEMA,
            ))
        return tasks


def _list_chunk(root: str, root_key: tuple[int, int], names: list[str]) -> Iterator[pa.Table]:
    """The rows of these top-level names, sub-folders walked; in blocks of at most ``_ROWS_PER_BLOCK``."""
    rows: list[TreeEntry] = []
    for name in names:
        rows.extend(_entries_of(root, root_key, name))
        while len(rows) >= _ROWS_PER_BLOCK:
            yield _table(root, rows[:_ROWS_PER_BLOCK])
            rows = rows[_ROWS_PER_BLOCK:]
    if rows:
        yield _table(root, rows)


def _entries_of(root: str, root_key: tuple[int, int], name: str) -> list[TreeEntry]:
    """One top-level name: a file, a problem, or a folder walked (loops back to ``root`` included)."""
    bad_name = unstorable_name(name)
    if bad_name is not None:
        return [bad_name]
    path = os.path.join(root, name)
    try:
        st = os.stat(path)  # follows symlinks, as scan_tree does
    except OSError as e:
        return [_unstattable(path, name, e)]
    if stat.S_ISREG(st.st_mode):
        return [TreeEntry(name)]
    if not stat.S_ISDIR(st.st_mode):
        return [TreeEntry(name, NOT_A_FILE, "not a regular file (FIFO, socket or device)")]
    key = (st.st_dev, st.st_ino)
    if key == root_key:
        return [TreeEntry(name, LINK_LOOP, f"folder link to {os.path.realpath(path)}, one of its own parents")]
    try:
        found = scan_tree(Path(path), outer=(root_key,))
    except OSError as e:  # the folder itself cannot be listed: as scan_tree reports a sub-folder it cannot list
        return [TreeEntry(name, UNREADABLE, f"cannot list folder: {e.strerror}")]
    return [TreeEntry(f"{name}/{e.rel}", e.problem, e.detail) for e in found]


def _table(root: str, entries: list[TreeEntry]) -> pa.Table:
    return pa.table({
        "path": pa.array([os.path.join(root, e.rel) for e in entries], pa.string()),
        "problem": pa.array([e.problem for e in entries], pa.string()),
        "detail": pa.array([e.detail for e in entries], pa.string()),
    }, schema=LISTING_SCHEMA)
