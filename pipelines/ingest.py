"""`msmae ingest`: a folder or manifest of images → validated, de-duplicated, split Parquet shards.

Flow (one function per step, in `ingest`): list (polars) → decode + validate + hash each
image once (process pool) → quarantine failures and label conflicts → split groups →
group-aware stratified split → dense `index` → shards, `quarantine.csv`, `dataset.json`.

Output layout in DIR:
    shards/<split>-<nnnnn>.parquet   one split per file, rows sorted by `index`
    quarantine.csv                  path, reason, detail — every listed file not kept
    dataset.json                    classes, counts, quarantine and duplicate summary, seed, ...

`index` is dense over the whole dataset and the train split comes first, so training rows
are exactly 0..n_train-1: the trainer's attention table is indexed by it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import images, sources, splits
from pipelines.dataset import SUMMARY_FILE, IngestedDataset

FORMAT_VERSION = 1
LABEL_CONFLICT = "duplicate_label_conflict"
_PARALLEL_MIN_FILES = 256  # below this a process pool costs more than it saves

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
    ]
)


class IngestError(RuntimeError):
    """Ingest stopped (bad arguments, or quarantined files under --strict)."""


def usable_cpus() -> int:
    """The CPUs this process may use (affinity, a container's CPU limit), not the node's cores
    that os.cpu_count() reports inside a pod. joblib is imported here, not at the top, so that
    importing this module stays cheap."""
    from joblib import cpu_count

    return cpu_count()


@dataclass(frozen=True)
class IngestOptions:
    """Everything that changes the output (all of it goes into the fingerprint)."""

    mode: str = "RGB"
    max_side: int | None = None
    val: float = 0.2
    test: float = 0.0
    seed: int = 0
    classes: list[str] | None = None
    rows_per_shard: int = 2048
    strict: bool = False
    workers: int = field(default_factory=usable_cpus, compare=False)


@dataclass
class IngestResult:
    out: Path
    summary: dict
    wrote: bool  # False when the output was already up to date


def tool_version() -> str:
    try:
        return metadata.version("msmae-ray")
    except metadata.PackageNotFoundError:
        return "0.1.0+src"  # running from a checkout that was not pip-installed


def ingest(
    src: Path | sources.ManifestSpec,
    out: Path,
    opts: IngestOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """Ingest `src` (an ImageFolder root or a manifest spec) into `out`; a no-op when up to date."""
    opts = opts or IngestOptions()  # built per call: its CPU count is this process's, now
    if opts.mode not in images.SUPPORTED_MODES:
        raise IngestError(f"--mode must be one of {images.SUPPORTED_MODES}, got {opts.mode!r}")
    fractions = splits.fractions_for(opts.val, opts.test)
    listing, source_info = _list(src, opts)
    fp = _fingerprint(listing, source_info, opts)
    existing = _load_if_current(out, fp)
    if existing is not None:
        log(f"{out} is up to date with its source and options: nothing rewritten")
        return IngestResult(out, existing, wrote=False)

    quarantine: list[dict] = [
        {"path": r["path"] or r["source"], "reason": r["problem"], "detail": _listing_detail(r)}
        for r in listing.filter(pl.col("problem").is_not_null()).iter_rows(named=True)
    ]
    candidates = listing.filter(pl.col("problem").is_null()).to_dicts()
    decoded = _decode_all([c["path"] for c in candidates], opts, progress)
    kept: list[dict] = []
    for c, res in zip(candidates, decoded, strict=True):
        if isinstance(res, images.Rejected):
            quarantine.append({"path": c["path"], "reason": res.reason, "detail": res.detail})
        else:
            kept.append({**c, "res": res})
    kept, conflicts = _drop_label_conflicts(kept, quarantine)

    n_quarantined = len(quarantine)
    if n_quarantined != listing.height - len(kept):
        raise AssertionError("ingest lost track of a file: kept + quarantined != listed")  # never silent
    out.mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "quarantine.csv", _quarantine_csv(quarantine))
    if n_quarantined:
        log(f"quarantined {n_quarantined} of {listing.height} files: {dict(Counter(q['reason'] for q in quarantine))} "
            f"(see {out / 'quarantine.csv'})")
    if opts.strict and n_quarantined:
        raise IngestError(f"--strict: {n_quarantined} files quarantined, no shards written; see {out / 'quarantine.csv'}")
    if not kept:
        raise IngestError(f"no usable images in {source_info}; see {out / 'quarantine.csv'}")

    class_ids = _class_ids(listing, opts)
    labels = [class_ids[k["label_name"]] for k in kept]
    group_ids = splits.split_groups([k["res"].content_hash for k in kept], [k["group"] for k in kept])
    split_of = splits.assign_splits(group_ids, labels, fractions, opts.seed)
    table = _build_table(kept, labels, group_ids, split_of, list(fractions))
    shards = _write_shards(out, table, opts.rows_per_shard)

    dup_sizes = Counter(k["res"].content_hash for k in kept)
    summary = {
        "format_version": FORMAT_VERSION,
        "tool": "msmae-ray",
        "tool_version": tool_version(),
        "fingerprint": fp,
        "source": source_info,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("workers", "strict")},
        "mode": opts.mode,
        "seed": opts.seed,
        "fractions": fractions,
        "classes": class_ids,
        "num_listed": listing.height,
        "num_images": table.num_rows,
        "counts": _counts(table, class_ids, list(fractions)),
        "index_ranges": _index_ranges(table, list(fractions)),
        "quarantined": n_quarantined,
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "duplicate_groups": sum(1 for n in dup_sizes.values() if n > 1),
        "duplicate_images": sum(n for n in dup_sizes.values() if n > 1),
        "label_conflict_groups": conflicts,
        "split_groups": len(set(group_ids)),
        "shards": shards,
    }
    _write_if_changed(out / SUMMARY_FILE, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
    return IngestResult(out, summary, wrote=True)


def _list(src: Path | sources.ManifestSpec, opts: IngestOptions) -> tuple[pl.DataFrame, dict]:
    if isinstance(src, sources.ManifestSpec):
        info = {
            "kind": "manifest",
            "manifest": str(src.manifest.resolve()),
            "image_root": str(src.image_root.resolve()),
            "image_col": src.image_col,
            "label_col": src.label_col,
            "group_col": src.group_col,
        }
        return sources.list_manifest(src, opts.classes), info
    return sources.list_image_folder(Path(src), opts.classes), {"kind": "image_folder", "root": str(Path(src).resolve())}


def _listing_detail(row: dict) -> str:
    return {
        sources.UNKNOWN_LABEL: f"label {row['label_name']!r} is not a declared class",
        sources.NO_CLASS_FOLDER: "file is not inside a class folder",
        sources.AMBIGUOUS_FILE: f"id {row['source']!r} matches several files with different extensions",
        sources.DUPLICATE_ROW: f"id {row['source']!r} appears more than once in the manifest; first row kept",
        sources.MISSING_FILE: f"no file for id {row['source']!r} under the image root",
    }.get(row["problem"], "")


def _fingerprint(listing: pl.DataFrame, source_info: dict, opts: IngestOptions) -> str:
    """Hash of the listing, each file's size and mtime, the manifest bytes and the options.

    Cheap (a stat per file, no decoding), so re-running an ingest whose inputs did not
    change returns at once. Like make, it trusts size + mtime to reveal edits.
    """
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, tool_version(), source_info, asdict(opts) | {"workers": 0, "strict": False}], sort_keys=True).encode())
    if source_info["kind"] == "manifest":
        h.update(Path(source_info["manifest"]).read_bytes())
    for row in listing.iter_rows():
        h.update(repr(row).encode())
        path = row[1]
        if path:
            try:
                st = os.stat(path)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


def _load_if_current(out: Path, fp: str) -> dict | None:
    try:
        summary = IngestedDataset.load(out).summary
    except (OSError, ValueError):
        return None
    if summary.get("fingerprint") != fp or not (out / "quarantine.csv").is_file():
        return None
    if not all((out / s["file"]).is_file() for s in summary.get("shards", [])):
        return None
    return summary


def _decode_all(paths: list[str], opts: IngestOptions, progress: bool) -> list[images.Accepted | images.Rejected]:
    """Decode every file once, in a process pool for large inputs; order is preserved."""
    from tqdm import tqdm

    fn = partial(images.process_file, mode=opts.mode, max_side=opts.max_side)
    bar = partial(tqdm, total=len(paths), desc="decode+validate", unit="img", disable=not progress, mininterval=1.0)
    if opts.workers <= 1 or len(paths) < _PARALLEL_MIN_FILES:
        return list(bar(map(fn, paths)))
    # spawn, not fork: the caller may hold threads (Ray, tqdm) that fork would copy mid-state.
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn")) as pool:
        return list(bar(pool.map(fn, paths, chunksize=32)))


def _drop_label_conflicts(kept: list[dict], quarantine: list[dict]) -> tuple[list[dict], int]:
    """Identical images with different labels cannot all be right: quarantine every copy."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for k in kept:
        labels_of[k["res"].content_hash].add(k["label_name"])
    bad = {h for h, ls in labels_of.items() if len(ls) > 1}
    for k in kept:
        h = k["res"].content_hash
        if h in bad:
            others = ", ".join(sorted(labels_of[h]))
            quarantine.append({"path": k["path"], "reason": LABEL_CONFLICT, "detail": f"identical image labelled {others}"})
    return [k for k in kept if k["res"].content_hash not in bad], len(bad)


def _class_ids(listing: pl.DataFrame, opts: IngestOptions) -> dict[str, int]:
    """Class ids: the --classes order if given, else the sorted names (torchvision's rule)."""
    if opts.classes:
        return {name: i for i, name in enumerate(opts.classes)}
    names = listing.filter(pl.col("problem").is_null())["label_name"].unique().sort().to_list()
    return {name: i for i, name in enumerate(names)}


def _build_table(kept: list[dict], labels: list[int], group_ids: list[int], split_of: list[str], split_names: list[str]) -> pa.Table:
    """Rows ordered by (split, source), so `index` is dense, stable and train-first."""
    rank = {s: i for i, s in enumerate(split_names)}
    order = sorted(range(len(kept)), key=lambda i: (rank[split_of[i]], kept[i]["source"], kept[i]["path"]))
    group_name = {g: kept[g]["group"] or kept[g]["res"].content_hash for g in set(group_ids)}
    cols: dict[str, list] = {f.name: [] for f in SHARD_SCHEMA}
    for idx, i in enumerate(order):
        k, res = kept[i], kept[i]["res"]
        for name, value in (
            ("index", idx), ("image_id", res.content_hash), ("source", k["source"]), ("image", res.data),
            ("label", labels[i]), ("label_name", k["label_name"]), ("group", group_name[group_ids[i]]),
            ("source_group", k["group"]), ("split", split_of[i]), ("width", res.width), ("height", res.height),
        ):
            cols[name].append(value)
    return pa.table(cols, schema=SHARD_SCHEMA)


def _write_shards(out: Path, table: pa.Table, rows_per_shard: int) -> list[dict]:
    """One or more files per split; stale shards from an earlier run with other options go."""
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
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
            _write_if_changed(out / rel, data)
            written.append({"file": rel, "split": split, "rows": chunk.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    keep = {w["file"] for w in written}
    for stale in shard_dir.glob("*.parquet"):
        if f"shards/{stale.name}" not in keep:
            stale.unlink()
    return written


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical existing file untouched (same mtime)."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _quarantine_csv(rows: list[dict]) -> bytes:
    df = pl.DataFrame(rows, schema={"path": pl.String, "reason": pl.String, "detail": pl.String})
    return df.sort(["reason", "path"]).write_csv().encode()


def _counts(table: pa.Table, class_ids: dict[str, int], split_names: list[str]) -> dict[str, dict[str, int]]:
    pairs = Counter(zip(table.column("split").to_pylist(), table.column("label_name").to_pylist(), strict=True))
    counts = {s: {c: pairs.get((s, c), 0) for c in class_ids} for s in split_names}
    for s in split_names:
        counts[s]["total"] = sum(counts[s][c] for c in class_ids)
    return counts


def _index_ranges(table: pa.Table, split_names: list[str]) -> dict[str, list[int]]:
    splits_col = table.column("split").to_pylist()
    ranges = {}
    for s in split_names:
        idx = [i for i, v in enumerate(splits_col) if v == s]
        ranges[s] = [idx[0], idx[-1] + 1] if idx else [0, 0]
    return ranges


def shard_files(out: Path, split: str) -> list[Path]:
    """The shard files of one split of an ingested folder (what the streams read); [] when it is empty."""
    return IngestedDataset.load(out).shard_files(split)


def iter_rows(out: Path, split: str) -> Iterator[dict]:
    """Plain (non-Ray) row iterator over one split, for tests and small tools."""
    for f in shard_files(out, split):
        yield from pq.read_table(f).to_pylist()
