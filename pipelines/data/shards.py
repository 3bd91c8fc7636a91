"""The Parquet shards of an ingested dataset: their schema, the table of kept images, and writing them.

One split per file, rows sorted by ``index`` (dense over the dataset, train first, so training
rows are exactly 0..n_train-1 and the trainer's attention table is indexed by it directly).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image_id", pa.string()),  # content hash of the normalised pixels
        ("source", pa.string()),  # relative path (ImageFolder) or manifest id
        ("image", pa.binary()),  # encoded JPEG/PNG bytes; decode then .convert(dataset mode)
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("group", pa.string()),  # split group: never in two splits
        ("source_group", pa.string()),  # the manifest's own group value (null for ImageFolder)
        ("split", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fingerprint", pa.binary()),  # near_duplicates.fingerprint: what the contamination check compares
    ]
)
# Only in datasets ingested with lesion masks (``pipelines.data.masks``): a 1-bit PNG per image, null where it
# has none. Datasets without masks keep SHARD_SCHEMA exactly, so their shards are byte-identical to before.
MASK_FIELD = pa.field("mask", pa.binary())
NEAR_DUPLICATES_FILE = "near_duplicates.parquet"  # the near-copy pairs that were held together, beside the shards
NEAR_DUPLICATES_SCHEMA = pa.schema([
    ("index_a", pa.int64()), ("index_b", pa.int64()), ("source_a", pa.string()), ("source_b", pa.string()),
    ("similarity", pa.float32()), ("split", pa.string()),
])


def dense_order(kept: list[dict], split_of: list[str], split_names: list[str]) -> list[int]:
    """The kept rows in ``index`` order: by (split, source), so `index` is dense, stable and train-first."""
    rank = {s: i for i, s in enumerate(split_names)}
    return sorted(range(len(kept)), key=lambda i: (rank[split_of[i]], kept[i]["source"], kept[i]["path"]))


def build_table(kept: list[dict], labels: list[int], group_ids: list[int], split_of: list[str], order: list[int]) -> pa.Table:
    """The shard rows, in ``order`` (``dense_order``); with a ``mask`` column when the rows carry masks."""
    group_name = {g: kept[g]["group"] or kept[g]["res"].content_hash for g in set(group_ids)}
    schema = SHARD_SCHEMA.append(MASK_FIELD) if any("mask" in k for k in kept) else SHARD_SCHEMA
    cols: dict[str, list] = {f.name: [] for f in schema}
    for idx, i in enumerate(order):
        k, res = kept[i], kept[i]["res"]
        for name, value in (
            ("index", idx), ("image_id", res.content_hash), ("source", k["source"]), ("image", res.data),
            ("label", labels[i]), ("label_name", k["label_name"]), ("group", group_name[group_ids[i]]),
            ("source_group", k["group"]), ("split", split_of[i]), ("width", res.width), ("height", res.height),
            ("fingerprint", res.fingerprint),
        ):
            cols[name].append(value)
        if "mask" in cols:
            cols["mask"].append(k.get("mask"))
    return pa.table(cols, schema=schema)


def near_duplicates_table(kept: list[dict], pairs, split_of: list[str], order: list[int]) -> pa.Table:
    """The near-copy pairs (kept-row indices ``i``, ``j``) as the dataset's ``index`` values and sources:
    what a user audits to see which copies were held together, and in which split."""
    position = {row: idx for idx, row in enumerate(order)}
    i, j = [int(x) for x in pairs["i"]], [int(x) for x in pairs["j"]]
    return pa.table({
        "index_a": [position[a] for a in i], "index_b": [position[b] for b in j],
        "source_a": [kept[a]["source"] for a in i], "source_b": [kept[b]["source"] for b in j],
        "similarity": [float(s) for s in pairs["similarity"]], "split": [split_of[a] for a in i],
    }, schema=NEAR_DUPLICATES_SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_shards(stage: Path, previous: Path, table: pa.Table, rows_per_shard: int) -> list[dict]:
    """One or more files per split, written into the staging folder."""
    written: list[dict] = []
    split_col = table.column("split").to_pylist()
    for split in dict.fromkeys(split_col):
        rows = [i for i, s in enumerate(split_col) if s == split]
        part = table.take(rows)
        for n, start in enumerate(range(0, part.num_rows, rows_per_shard)):
            chunk = part.slice(start, rows_per_shard)
            rel = f"shards/{split}-{n:05d}.parquet"
            sink = pa.BufferOutputStream()
            pq.write_table(chunk, sink, compression="zstd", row_group_size=256)
            data = sink.getvalue().to_pybytes()
            write_file(stage, rel, data, previous)
            written.append({"file": rel, "split": split, "rows": chunk.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    return written


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (what ``write_shards`` records per shard)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_file(stage: Path, rel: str, data: bytes, previous: Path) -> None:
    """Write `rel` into the staging folder. A file identical to the one already published in
    `previous` is hard-linked instead, so its mtime (and anything keyed on it) stays as it was."""
    target = stage / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    old = previous / rel
    try:
        if old.is_file() and old.stat().st_size == len(data) and old.read_bytes() == data:
            os.link(old, target)
            return
    except OSError:
        pass  # another file system, or links not allowed: write a copy
    target.write_bytes(data)


def quarantine_csv(rows: list[dict]) -> bytes:
    df = pl.DataFrame(rows, schema={"path": pl.String, "reason": pl.String, "detail": pl.String})
    return df.sort(["reason", "path"]).write_csv().encode()


def counts(table: pa.Table, class_ids: dict[str, int], split_names: list[str]) -> dict[str, dict[str, int]]:
    pairs = Counter(zip(table.column("split").to_pylist(), table.column("label_name").to_pylist(), strict=True))
    counts = {s: {c: pairs.get((s, c), 0) for c in class_ids} for s in split_names}
    for s in split_names:
        counts[s]["total"] = sum(counts[s][c] for c in class_ids)
    return counts


def index_ranges(table: pa.Table, split_names: list[str]) -> dict[str, list[int]]:
    splits_col = table.column("split").to_pylist()
    ranges = {}
    for s in split_names:
        idx = [i for i, v in enumerate(splits_col) if v == s]
        ranges[s] = [idx[0], idx[-1] + 1] if idx else [0, 0]
    return ranges
