"""Output paths of the commands: checked before any work, written whole or not at all.

Why: ``evaluate`` used to compute and print its metrics, then fail on an ``--out`` under a
missing folder and write nothing; ``predict`` could leave half a Parquet file. An output
path is now checked up front (not a folder, under a folder, writable), and every file is
written to a temporary name beside it and renamed into place.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that could not be written at the end (a usage error: choose another path)."""


def _nearest_existing(path: Path) -> Path:
    return next(p for p in (path, *path.parents) if p.exists() or p == p.parent)


def _check_parent(path: Path, option: str) -> None:
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputPathError(f"{option} {path}: {ancestor} is a file, not a folder; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option} {path}: cannot write into {ancestor} (permission denied); choose another path")


def check_output_file(path: Path, option: str) -> None:
    """Refuse, before any work, a file path that could not be written at the end (missing folders are fine: they are made)."""
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file path, e.g. {path / 'out'}")
    _check_parent(path, option)


def check_output_dir(path: Path, option: str) -> None:
    """Refuse, before any work, a folder path that is a file or lies under one."""
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file, not a folder; choose another {option}")
    _check_parent(path, option)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and a rename: a reader sees the old file or the
    whole new one, never half of it, and a failure leaves the old one in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
