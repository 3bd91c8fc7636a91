"""An ingested dataset as the rest of the pipeline sees it: ``dataset.json`` read once, typed.

``msmae ingest`` writes the folder (Parquet shards, ``quarantine.csv``, ``dataset.json``);
everything downstream — streams, training, evaluation, sweeps — asks this class for the
class names, split sizes, shard files and fingerprint instead of parsing the JSON itself.
Standard library only at import (pyarrow is imported by ``rows`` alone): every Ray Data process imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUMMARY_FILE = "dataset.json"
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("classes", "fractions", "counts", "shards")  # what every reader below relies on


@dataclass(frozen=True)
class IngestedDataset:
    """A folder made by ``msmae ingest``; ``summary`` is its ``dataset.json`` as written."""

    path: Path
    summary: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path) -> "IngestedDataset":
        path = Path(path)
        summary_path = path / SUMMARY_FILE
        if not summary_path.is_file():
            raise FileNotFoundError(f"{summary_path} not found: run `msmae ingest SRC --out {path}` first")
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError as e:
            raise ValueError(f"{summary_path} is not valid JSON ({e}); re-run `msmae ingest` into {path}") from None
        if not isinstance(summary, dict):
            raise ValueError(f"{summary_path} is not an msmae dataset summary (a JSON object); re-run `msmae ingest` into {path}")
        missing = [key for key in REQUIRED_KEYS if key not in summary]
        if missing:
            raise ValueError(f"{summary_path} lacks {', '.join(missing)}: it was not written by `msmae ingest`, or was edited; "
                             f"re-run `msmae ingest` into {path}")
        return cls(path, summary)

    @staticmethod
    def is_ingested(path: str | Path) -> bool:
        """Does ``path`` hold an ingested dataset (rather than raw images)?"""
        return (Path(path) / SUMMARY_FILE).is_file()

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def class_names(self) -> list[str]:
        """Class names in id order (``dataset.json`` stores name -> id)."""
        return [name for name, _ in sorted(self.summary["classes"].items(), key=lambda kv: kv[1])]

    @property
    def num_classes(self) -> int:
        return len(self.summary["classes"])

    @property
    def fingerprint(self) -> str:
        return self.summary.get("fingerprint", "")

    @property
    def has_masks(self) -> bool:
        """Was it ingested with lesion masks (``msmae ingest --masks``)? Then its shards have a ``mask`` column."""
        return bool(self.summary.get("masks"))

    @property
    def splits(self) -> list[str]:
        """The splits this dataset was made with (an empty one included)."""
        return list(self.summary["fractions"])

    def split_size(self, split: str) -> int:
        """Images in ``split``; 0 for a split that is empty or was not made."""
        counts = self.summary["counts"].get(split, {})
        return int(counts.get("total", sum(counts.values())))

    def class_counts(self, split: str) -> list[int]:
        """Images of each class in ``split``, in class-id order (0 for a class it lacks)."""
        counts = self.summary["counts"].get(split, {})
        return [int(counts.get(name, 0)) for name in self.class_names]

    def non_empty_splits(self) -> list[str]:
        return [s for s in SPLITS if self.split_size(s)]

    def rows(self, split: str) -> Iterator[dict[str, Any]]:
        """Every row of ``split`` as a dict, read plainly with pyarrow (no Ray): for bundles, tests and small tools."""
        import pyarrow.parquet as pq

        for file in self.shard_files(split):
            yield from pq.read_table(file).to_pylist()

    def fingerprints(self, splits: tuple[str, ...]) -> tuple[Any, Any]:
        """``(index [N], fingerprints [N, 256] int8)`` of the images of ``splits`` (``near_duplicates``), read
        from the shards' ``fingerprint`` column alone. A dataset ingested before fingerprints has none: ([], [])."""
        import numpy as np
        import pyarrow.parquet as pq

        from pipelines.data import near_duplicates

        index, fps = [], []
        for split in splits:
            if split not in self.summary["fractions"]:
                continue
            for file in self.shard_files(split):
                if "fingerprint" not in pq.read_schema(file).names:
                    return np.zeros(0, np.int64), np.zeros((0, near_duplicates.FINGERPRINT_BYTES), np.int8)
                table = pq.read_table(file, columns=["index", "fingerprint"])
                index += table.column("index").to_pylist()
                fps += table.column("fingerprint").to_pylist()
        return np.asarray(index, dtype=np.int64), near_duplicates.as_array(fps)

    def shard_files(self, split: str) -> list[Path]:
        """The Parquet shards of ``split`` (what the streams read); [] when it is empty."""
        if split not in self.summary["fractions"]:
            raise ValueError(f"{self.path} has no {split!r} split; it has {self.splits}")
        return [self.path / s["file"] for s in self.summary["shards"] if s["split"] == split]
