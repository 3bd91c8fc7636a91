"""Where ``msmae ingest`` writes: an ``--out`` it may not damage is refused, and the dataset is built in a
staging folder beside it and swapped in whole, so ``--out`` holds the old dataset or the new one, never half.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipelines.data import sources
from pipelines.data.dataset import SUMMARY_FILE, IngestedDataset
from pipelines.data.ingest_options import IngestOptionError

INGEST_OUTPUTS = (SUMMARY_FILE, "quarantine.csv", "excluded.csv", "shards", "near_duplicates.parquet", "mask_quarantine.csv")  # all an output folder holds


def overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_destination(out: Path, source_info: dict, force: bool) -> None:
    """Refuse an --out that ingest would damage, before any work: a file, a folder of other
    files, a folder overlapping the inputs, or a dataset of another source (unless --force)."""
    ancestor = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if ancestor != out and not ancestor.is_dir():
        raise IngestOptionError(f"--out {out}: {ancestor} is a file, not a folder; choose another --out")
    if out.exists() and not out.is_dir():
        raise IngestOptionError(f"--out {out} is a file; give a folder (it will hold shards/, quarantine.csv, dataset.json)")
    for path in sources.input_paths(source_info):
        if overlaps(out, path):
            raise IngestOptionError(f"--out {out} overlaps the input {path}; write the dataset outside its source")
    if not out.is_dir():
        return
    if not (out / SUMMARY_FILE).is_file():
        others = sorted(p.name for p in out.iterdir() if p.name != "quarantine.csv")
        if others:
            raise IngestOptionError(
                f"--out {out} is not empty and holds no msmae dataset ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                "choose a new or empty folder"
            )
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in INGEST_OUTPUTS)
    if foreign:
        raise IngestOptionError(f"--out {out} holds files ingest did not write ({', '.join(foreign[:3])}); "
                                "move them out, or choose another --out (ingest replaces the whole folder)")
    try:
        old = IngestedDataset.load(out).summary.get("source")
    except (OSError, ValueError, AttributeError):
        old = None
    if sources.source_key(old) != sources.source_key(source_info) and not force:
        raise IngestOptionError(
            f"--out {out} holds a dataset ingested from {sources.describe(old)}, not from {sources.describe(source_info)}; "
            "pass --force (msmae ingest) to replace it, or choose another --out (msmae run: another --workdir)"
        )


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` (same file system, so publishing it is a rename), removed unless published."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    stage = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would become the published folder's mode
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already when it was published


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.ingest-{socket.gethostname()}-"


def remove_stale_staging(out: Path) -> list[Path]:
    """Staging folders beside ``out`` left by an ingest that was killed (its process is gone), removed.

    Only this host's: a folder's name carries the host and process id that made it, and a live
    process (or another host's, on a shared file system) keeps its folder."""
    prefix, removed = _staging_prefix(out), []
    for folder in out.parent.glob(f"{prefix}*"):
        pid = folder.name.removeprefix(prefix).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def publish(stage: Path, out: Path) -> None:
    """Put the finished folder in place of `out`; an old one is renamed aside first, then removed."""
    if not out.exists():
        os.rename(stage, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
    os.rename(out, aside / "old")
    try:
        os.rename(stage, out)
    except OSError:
        os.rename(aside / "old", out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def keep_failed_quarantine(stage: Path, out: Path) -> Path:
    """Where a failed run's quarantine list goes: into `out` when it holds no dataset (a folder
    with only quarantine.csv), else beside it, so the dataset already there stays whole."""
    if not (out / SUMMARY_FILE).is_file():
        publish(stage, out)
        return out / "quarantine.csv"
    beside = out.with_name(f"{out.name}.rejected-quarantine.csv")
    os.replace(stage / "quarantine.csv", beside)
    return beside
