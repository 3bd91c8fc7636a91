"""`msmae ingest`: a folder or manifest of images → validated, de-duplicated, split Parquet shards.

Flow (one function per step, in `ingest`): list (polars) → decode + validate + hash each
image once (process pool) → quarantine failures and label conflicts → split groups →
group-aware stratified split → dense `index` → shards, `quarantine.csv`, `dataset.json`.

Output layout in DIR:
    shards/<split>-<nnnnn>.parquet   one split per file, rows sorted by `index`
    quarantine.csv                  path, reason, detail — every listed file not kept
    dataset.json                    classes, counts, quarantine and duplicate summary, seed, ...

DIR is built in a folder beside it and renamed into place when complete: it always holds a
whole dataset or none, and a failed run leaves the one already there as it was.

`index` is dense over the whole dataset and the train split comes first, so training rows
are exactly 0..n_train-1: the trainer's attention table is indexed by it directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
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
    """Ingest stopped: quarantined files under --strict, or nothing usable (the command exits 1)."""


class IngestOptionError(IngestError):
    """An option or the output folder was refused before anything was read or written (a usage error: exit 2)."""


def usable_cpus() -> int:
    """The CPUs this process may use (affinity, a container's CPU limit), not the node's cores
    that os.cpu_count() reports inside a pod. joblib is imported here, not at the top, so that
    importing this module stays cheap."""
    from joblib import cpu_count

    return cpu_count()


@dataclass(frozen=True)
class IngestOptions:
    """Everything that changes the output (all of it goes into the fingerprint), and how to run."""

    mode: str = "RGB"
    max_side: int | None = None
    min_side: int = images.DEFAULT_MIN_SIDE
    val: float = 0.2
    test: float = 0.0
    seed: int = 0
    classes: list[str] | None = None
    rows_per_shard: int = 2048
    strict: bool = False
    force: bool = False  # replace a dataset ingested from another source
    workers: int = field(default_factory=usable_cpus, compare=False)


RUN_ONLY_OPTIONS = ("workers", "strict", "force")  # how ingest runs, not what it writes
INGEST_OUTPUTS = (SUMMARY_FILE, "quarantine.csv", "shards")  # all an output folder holds


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


def check_options(opts: IngestOptions) -> dict[str, float]:
    """Refuse options that would write a wrong or empty dataset, before anything is read; returns the split fractions.

    Why here and not only in the CLI: ``msmae run`` and ``msmae evaluate`` ingest too.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise IngestOptionError(message)

    need(opts.mode in images.SUPPORTED_MODES, f"--mode must be one of {', '.join(images.SUPPORTED_MODES)}, got {opts.mode!r}")
    need(opts.rows_per_shard >= 1, f"--rows-per-shard must be at least 1, got {opts.rows_per_shard}")
    need(opts.workers >= 1, f"--workers must be at least 1, got {opts.workers}")
    need(opts.min_side >= 1, f"--min-side must be at least 1 pixel, got {opts.min_side}")
    need(opts.max_side is None or opts.max_side >= opts.min_side,
         f"--max-side must be at least --min-side ({opts.min_side} px), got {opts.max_side}")
    if opts.classes is not None:
        need(all(c.strip() for c in opts.classes), f"--classes has an empty name: {','.join(opts.classes)!r}")
        repeated = sorted(c for c, n in Counter(opts.classes).items() if n > 1)
        need(not repeated, f"--classes names {', '.join(repeated)} more than once; each class needs one id")
    try:
        return splits.fractions_for(opts.val, opts.test)
    except ValueError as e:
        raise IngestOptionError(f"--val/--test: {e}") from None


def ingest(
    src: Path | sources.ManifestSpec,
    out: Path,
    opts: IngestOptions | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> IngestResult:
    """Ingest `src` (an ImageFolder root or a manifest spec) into `out`; a no-op when up to date.

    The dataset is built in a folder beside `out` and renamed into place only when complete,
    so `out` always holds a whole dataset (the old one or the new one) or nothing; a failed
    run leaves a dataset already there untouched.
    """
    opts = opts or IngestOptions()  # built per call: its CPU count is this process's, now
    fractions = check_options(opts)
    source_info = _source_info(src)
    _check_destination(out, source_info, opts.force)
    listing = _list(src, opts)
    fp = _fingerprint(listing, source_info, opts)
    existing = _load_if_current(out, fp)
    if existing is not None:
        log(f"{out} is up to date with its source and options: nothing rewritten")
        return IngestResult(out, existing, wrote=False)

    quarantine, kept, conflicts = _sort_out(listing, opts, progress)
    if len(quarantine) != listing.height - len(kept):
        raise AssertionError("ingest lost track of a file: kept + quarantined != listed")  # never silent
    counted = f"quarantined {len(quarantine)} of {listing.height} files: {dict(Counter(q['reason'] for q in quarantine))}"
    with _staging(out) as stage:
        _write(stage, "quarantine.csv", _quarantine_csv(quarantine), out)
        if not kept or (opts.strict and quarantine):
            if quarantine:
                log(counted)
            kept_old = (out / SUMMARY_FILE).is_file()
            where = _keep_failed_quarantine(stage, out)
            unchanged = f"; the dataset already in {out} is unchanged" if kept_old else ""
            if opts.strict and quarantine:
                raise IngestError(f"--strict: {len(quarantine)} of {listing.height} files quarantined, no dataset written{unchanged}; see {where}")
            raise IngestError(f"no usable images in {_describe(source_info)} ({listing.height} files listed){unchanged}; see {where}")
        summary = _write_dataset(stage, out, kept, listing, quarantine, conflicts, fp, source_info, opts, fractions)
        _publish(stage, out)
    if quarantine:
        log(f"{counted} (see {out / 'quarantine.csv'})")
    for warning in summary["warnings"]:
        log(f"warning: {warning}")
    return IngestResult(out, summary, wrote=True)


def _sort_out(listing: pl.DataFrame, opts: IngestOptions, progress: bool) -> tuple[list[dict], list[dict], int]:
    """Every listed file kept or quarantined with a reason: (quarantine rows, kept rows, label-conflict groups)."""
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
    return quarantine, kept, conflicts


def _write_dataset(
    stage: Path, out: Path, kept: list[dict], listing: pl.DataFrame, quarantine: list[dict], conflicts: int,
    fp: str, source_info: dict, opts: IngestOptions, fractions: dict[str, float],
) -> dict:
    """Split the kept images, write shards and dataset.json into the staging folder; returns the summary."""
    class_ids = _class_ids(listing, opts)
    labels = [class_ids[k["label_name"]] for k in kept]
    group_ids = splits.split_groups([k["res"].content_hash for k in kept], [k["group"] for k in kept])
    split_of = splits.assign_splits(group_ids, labels, fractions, opts.seed)
    table = _build_table(kept, labels, group_ids, split_of, list(fractions))
    shards = _write_shards(stage, out, table, opts.rows_per_shard)

    dup_sizes = Counter(k["res"].content_hash for k in kept)
    summary = {
        "format_version": FORMAT_VERSION,
        "tool": "msmae-ray",
        "tool_version": tool_version(),
        "fingerprint": fp,
        "source": source_info,
        "options": _output_options(opts),
        "mode": opts.mode,
        "seed": opts.seed,
        "fractions": fractions,
        "classes": class_ids,
        "num_listed": listing.height,
        "num_images": table.num_rows,
        "counts": _counts(table, class_ids, list(fractions)),
        "index_ranges": _index_ranges(table, list(fractions)),
        "quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "duplicate_groups": sum(1 for n in dup_sizes.values() if n > 1),
        "duplicate_images": sum(n for n in dup_sizes.values() if n > 1),
        "label_conflict_groups": conflicts,
        "split_groups": len(set(group_ids)),
        "shards": shards,
        "warnings": _class_size_warnings(Counter(labels), class_ids, list(fractions)),
    }
    _write(stage, SUMMARY_FILE, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode(), out)
    return summary


def _class_size_warnings(per_class: Counter, class_ids: dict[str, int], split_names: list[str]) -> list[str]:
    """A class with fewer images than splits cannot appear in all of them: train on it and never validate it, or the reverse."""
    need = len(split_names)
    return [
        f"class {name!r} has {per_class.get(cid, 0)} usable image(s); it needs at least {need} to appear in every split "
        f"({', '.join(split_names)}): add images, or leave it out with --classes"
        for name, cid in class_ids.items() if per_class.get(cid, 0) < need
    ]


def _source_info(src: Path | sources.ManifestSpec) -> dict:
    if isinstance(src, sources.ManifestSpec):
        return {
            "kind": "manifest",
            "manifest": str(src.manifest.resolve()),
            "image_root": str(src.image_root.resolve()),
            "image_col": src.image_col,
            "label_col": src.label_col,
            "group_col": src.group_col,
        }
    return {"kind": "image_folder", "root": str(Path(src).resolve())}


def _list(src: Path | sources.ManifestSpec, opts: IngestOptions) -> pl.DataFrame:
    if isinstance(src, sources.ManifestSpec):
        return sources.list_manifest(src, opts.classes)
    return sources.list_image_folder(Path(src), opts.classes)


def _source_key(info: dict | None) -> tuple:
    """What makes two ingests 'the same source' (columns and options may change; the inputs may not)."""
    if not isinstance(info, dict):
        return ("unknown",)
    if info.get("kind") == "manifest":
        return ("manifest", info.get("manifest"), info.get("image_root"))
    return (info.get("kind"), info.get("root"))


def _describe(info: dict | None) -> str:
    if not isinstance(info, dict):
        return "an unknown source"
    if info.get("kind") == "manifest":
        return f"manifest {info.get('manifest')} (images under {info.get('image_root')})"
    return str(info.get("root"))


def _input_paths(info: dict) -> list[Path]:
    return [Path(info[k]) for k in ("root", "manifest", "image_root") if info.get(k)]


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _check_destination(out: Path, source_info: dict, force: bool) -> None:
    """Refuse an --out that ingest would damage, before any work: a file, a folder of other
    files, a folder overlapping the inputs, or a dataset of another source (unless --force)."""
    ancestor = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if ancestor != out and not ancestor.is_dir():
        raise IngestOptionError(f"--out {out}: {ancestor} is a file, not a folder; choose another --out")
    if out.exists() and not out.is_dir():
        raise IngestOptionError(f"--out {out} is a file; give a folder (it will hold shards/, quarantine.csv, dataset.json)")
    for path in _input_paths(source_info):
        if _overlaps(out, path):
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
        old = json.loads((out / SUMMARY_FILE).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        old = None
    if _source_key(old) != _source_key(source_info) and not force:
        raise IngestOptionError(
            f"--out {out} holds a dataset ingested from {_describe(old)}, not from {_describe(source_info)}; "
            "pass --force (msmae ingest) to replace it, or choose another --out (msmae run: another --workdir)"
        )


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` (same file system, so publishing it is a rename), removed unless published."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.ingest-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp's 0700 would become the published folder's mode
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone already when it was published


def _publish(stage: Path, out: Path) -> None:
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


def _keep_failed_quarantine(stage: Path, out: Path) -> Path:
    """Where a failed run's quarantine list goes: into `out` when it holds no dataset (a folder
    with only quarantine.csv), else beside it, so the dataset already there stays whole."""
    if not (out / SUMMARY_FILE).is_file():
        _publish(stage, out)
        return out / "quarantine.csv"
    beside = out.with_name(f"{out.name}.rejected-quarantine.csv")
    os.replace(stage / "quarantine.csv", beside)
    return beside


def _listing_detail(row: dict) -> str:
    if row.get("detail"):
        return row["detail"]
    return {
        sources.UNKNOWN_LABEL: f"label {row['label_name']!r} is not a declared class",
        sources.MISSING_LABEL: "no label (an empty cell or a missing-value token such as NA, nan, None)",
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
    h.update(json.dumps([FORMAT_VERSION, tool_version(), source_info, _output_options(opts)], sort_keys=True).encode())
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


def _output_options(opts: IngestOptions) -> dict:
    return {k: v for k, v in asdict(opts).items() if k not in RUN_ONLY_OPTIONS}


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

    fn = partial(images.process_file, mode=opts.mode, max_side=opts.max_side, min_side=opts.min_side)
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


def _write_shards(stage: Path, previous: Path, table: pa.Table, rows_per_shard: int) -> list[dict]:
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
            _write(stage, rel, data, previous)
            written.append({"file": rel, "split": split, "rows": chunk.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    return written


def _write(stage: Path, rel: str, data: bytes, previous: Path) -> None:
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
