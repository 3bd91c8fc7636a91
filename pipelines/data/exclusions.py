"""Files of a listing that ingest leaves out on purpose: ``--exclude`` globs, and masks saved beside their images.

Left-out files are not quarantined (they are not broken, and ``--strict`` must not fail on them),
but they are not dropped silently either: each is written to ``excluded.csv`` with its reason,
counted in ``dataset.json`` and named in ingest's summary.

Globs are matched against the path relative to the source root (the ImageFolder root, or a
manifest's ``--image-root``) with ``fnmatch`` rules, where ``*`` also matches ``/``
(``*_mask.png`` matches ``benign/x_mask.png``); a pattern without ``/`` is also tried against
the file name alone, so ``Thumbs.db`` matches in every folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import polars as pl

from pipelines.data.mask_files import find_mask_files

EXCLUDED_FILE = "excluded.csv"
BY_PATTERN = "exclude_pattern"
MASK_LIKE = "mask_like"


@dataclass
class Excluded:
    """What was left out of a listing, and why (rows for ``excluded.csv``, and the summary's counts)."""

    rows: list[dict] = field(default_factory=list)  # path (relative to the root), reason, detail
    patterns: tuple[str, ...] = ()
    mask_like_kept: list[str] = field(default_factory=list)  # mask-like files ingested anyway (--keep-mask-like)

    def count(self, reason: str) -> int:
        return sum(1 for r in self.rows if r["reason"] == reason)

    def first(self, reason: str) -> str | None:
        return next((r["path"] for r in self.rows if r["reason"] == reason), None)

    def summary(self) -> dict:
        return {
            "patterns": list(self.patterns), "by_pattern": self.count(BY_PATTERN), "mask_like": self.count(MASK_LIKE),
            "mask_like_example": self.first(MASK_LIKE), "mask_like_kept": len(self.mask_like_kept),
            "mask_like_kept_example": self.mask_like_kept[0] if self.mask_like_kept else None,
        }

    def messages(self) -> list[str]:
        """One line per kind of file left out, for the ingest log."""
        lines = []
        if self.patterns:
            lines.append(f"left out {self.count(BY_PATTERN)} file(s) matching --exclude {' '.join(self.patterns)}")
        if self.count(MASK_LIKE):
            lines.append(f"left out {self.count(MASK_LIKE)} mask-like file(s), named like the mask of an image beside them "
                         f"(e.g. {self.first(MASK_LIKE)}); --keep-mask-like ingests them as images")
        return lines


def matches(rel: str, pattern: str) -> bool:
    """``rel`` (a POSIX path relative to the root) matches the glob ``pattern`` (see the module docstring)."""
    return fnmatchcase(rel, pattern) or ("/" not in pattern and fnmatchcase(PurePosixPath(rel).name, pattern))


def leave_out(listing: pl.DataFrame, root: Path, patterns: tuple[str, ...], keep_mask_like: bool) -> tuple[pl.DataFrame, Excluded]:
    """The listing without the files ``patterns`` match and (unless ``keep_mask_like``) the mask-like ones.

    A row without a resolved path (a manifest id with no file) is never left out: it stays to be quarantined.
    Mask-like files are looked for among the files that remain after the patterns."""
    prefix = str(root.resolve()) + os.sep
    rels = [_relative(p, prefix) for p in listing["path"].to_list()]
    excluded = Excluded(patterns=tuple(patterns))
    drop: set[int] = set()
    for i, rel in enumerate(rels):
        hit = next((p for p in patterns if rel is not None and matches(rel, p)), None)
        if hit is not None:
            drop.add(i)
            excluded.rows.append({"path": rel, "reason": BY_PATTERN, "detail": f"--exclude {hit}"})
    remaining: dict[str, list[int]] = {}  # a manifest may name one file in several rows
    for i, rel in enumerate(rels):
        if rel is not None and i not in drop:
            remaining.setdefault(rel, []).append(i)
    masks = find_mask_files(remaining)
    if keep_mask_like:
        excluded.mask_like_kept = sorted(masks)
    else:
        for mask, image in sorted(masks.items()):
            drop.update(remaining[mask])
            excluded.rows.extend({"path": mask, "reason": MASK_LIKE, "detail": f"named like a mask of {image}"} for _ in remaining[mask])
    if not drop:
        return listing, excluded
    keep = pl.Series([i not in drop for i in range(listing.height)])
    return listing.filter(keep), excluded


def _relative(path: str | None, prefix: str) -> str | None:
    if path is None:
        return None
    rel = path[len(prefix):] if path.startswith(prefix) else path
    return rel.replace(os.sep, "/")
