"""`msmae ingest`: a folder or manifest of images → validated, de-duplicated, split Parquet shards.

Flow (one function per step, in `ingest`): list (polars) → decode + validate + hash and
fingerprint each image once (process pool) → quarantine failures and label conflicts →
near-copy pairs → split groups → group-aware stratified split → dense `index` → shards,
`near_duplicates.parquet`, `quarantine.csv`, `dataset.json`.

Output layout in DIR:
    shards/<split>-<nnnnn>.parquet   one split per file, rows sorted by `index`
    near_duplicates.parquet         the near-copy pairs held together (index, source, similarity, split)
    quarantine.csv                  path, reason, detail — every listed file not kept
    excluded.csv                    path, reason, detail — files left out on purpose (--exclude, mask-like)
    dataset.json                    classes, counts, quarantine and duplicate summary, seed, ...

DIR is built in a folder beside it and renamed into place when complete: it always holds a
whole dataset or none, and a failed run leaves the one already there as it was.

`index` is dense over the whole dataset and the train split comes first, so training rows
are exactly 0..n_train-1: the trainer's attention table is indexed by it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl

from pipelines.data import destination, exclusions, images, masks, near_duplicates, shards, sources, splits
from pipelines.data.dataset import SUMMARY_FILE, IngestedDataset
from pipelines.data.ingest_options import IngestError, IngestOptionError, IngestOptions, check_options, output_options

__all__ = ["IngestError", "IngestOptionError", "IngestOptions", "IngestResult", "ingest"]

FORMAT_VERSION = 1
LABEL_CONFLICT = "duplicate_label_conflict"
_PARALLEL_MIN_FILES = 256  # below this a process pool costs more than it saves


@dataclass
class IngestResult:
    out: Path
    summary: dict
    wrote: bool  # False when the output was already up to date

    @property
    def dataset(self) -> IngestedDataset:
        """The ingested dataset, without reading back the ``dataset.json`` just written."""
        return IngestedDataset(self.out, self.summary)


def tool_version() -> str:
    try:
        return metadata.version("msmae-ray")
    except metadata.PackageNotFoundError:
        return "0.1.0+src"  # running from a checkout that was not pip-installed


def ingest(
    src: Path | sources.Source,
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
    source = sources.as_source(src)
    source_info = source.info()
    destination.check_destination(out, source_info, opts.force)
    mask_spec = _mask_spec(opts, source)
    listing, excluded = exclusions.leave_out(source.listing(opts.classes), _source_root(source_info), opts.exclude, opts.keep_mask_like)
    fp = _fingerprint(listing, source, opts)
    if mask_spec is not None:
        fp = hashlib.sha256(fp.encode() + masks.fingerprint_bytes(mask_spec)).hexdigest()
    existing = _load_if_current(out, fp, opts.verify, log)
    if existing is not None:
        checked = "its shards match their digests" if opts.verify else "--verify checks its shards' digests"
        log(f"{out} is up to date with its source and options ({checked}): nothing rewritten")
        return IngestResult(out, existing, wrote=False)

    quarantine, kept, conflicts = _sort_out(listing, opts, progress)
    if len(quarantine) != listing.height - len(kept):
        raise AssertionError("ingest lost track of a file: kept + quarantined != listed")  # never silent
    counted = f"quarantined {len(quarantine)} of {listing.height} files: {dict(Counter(q['reason'] for q in quarantine))}"
    mask_report = _attach_masks(kept, mask_spec, source)
    for line in excluded.messages():
        log(line)
    with destination.staging(out) as stage:
        shards.write_file(stage, "quarantine.csv", shards.quarantine_csv(quarantine), out)
        shards.write_file(stage, exclusions.EXCLUDED_FILE, shards.quarantine_csv(excluded.rows), out)
        if mask_report is not None:
            shards.write_file(stage, masks.MASK_QUARANTINE_FILE, masks.quarantine_csv(mask_report.quarantine), out)
        if not kept or (opts.strict and quarantine):
            if quarantine:
                log(counted)
            kept_old = (out / SUMMARY_FILE).is_file()
            where = destination.keep_failed_quarantine(stage, out)
            unchanged = f"; the dataset already in {out} is unchanged" if kept_old else ""
            if opts.strict and quarantine:
                raise IngestError(f"--strict: {len(quarantine)} of {listing.height} files quarantined, no dataset written{unchanged}; see {where}")
            raise IngestError(f"no usable images in {sources.describe(source_info)} ({listing.height} files listed){unchanged}; see {where}")
        summary = _write_dataset(stage, out, kept, listing, quarantine, conflicts, fp, source_info, opts, fractions, excluded, mask_report)
        destination.publish(stage, out)
    if quarantine:
        log(f"{counted} (see {out / 'quarantine.csv'})")
    if mask_report is not None:
        m = mask_report.summary()
        log(f"lesion masks: {m['paired']} of {len(kept)} images paired ({m['thresholded']} thresholded to binary), "
            f"{m['quarantined']} quarantined {m['quarantine_reasons']} (see {out / masks.MASK_QUARANTINE_FILE}), "
            f"{m['unclaimed']} masks in the folder claimed by no kept image")
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
    fp: str, source_info: dict, opts: IngestOptions, fractions: dict[str, float], excluded: exclusions.Excluded,
    mask_report: masks.MaskReport | None = None,
) -> dict:
    """Split the kept images, write shards and dataset.json into the staging folder; returns the summary."""
    class_ids = _class_ids(listing, opts)
    labels = [class_ids[k["label_name"]] for k in kept]
    pairs = _near_copy_pairs(kept, opts)
    group_ids = splits.split_groups([k["res"].content_hash for k in kept], [k["group"] for k in kept], zip(pairs["i"], pairs["j"]))
    split_of = splits.assign_splits(group_ids, labels, fractions, opts.seed)
    order = shards.dense_order(kept, split_of, list(fractions))  # row of each dataset index
    table = shards.build_table(kept, labels, group_ids, split_of, order)
    written = shards.write_shards(stage, out, table, opts.rows_per_shard)
    near = shards.near_duplicates_table(kept, pairs, split_of, order)
    shards.write_file(stage, shards.NEAR_DUPLICATES_FILE, shards.table_bytes(near), out)

    dup_sizes = Counter(k["res"].content_hash for k in kept)
    near_rows = set(near.column("index_a").to_pylist()) | set(near.column("index_b").to_pylist())
    summary = {
        "format_version": FORMAT_VERSION,
        "tool": "msmae-ray",
        "tool_version": tool_version(),
        "fingerprint": fp,
        "source": source_info,
        "options": output_options(opts),
        "mode": opts.mode,
        "seed": opts.seed,
        "fractions": fractions,
        "classes": class_ids,
        "num_listed": listing.height,
        "num_images": table.num_rows,
        "counts": shards.counts(table, class_ids, list(fractions)),
        "index_ranges": shards.index_ranges(table, list(fractions)),
        "excluded": excluded.summary(),
        "quarantined": len(quarantine),
        "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in quarantine).items())),
        "duplicate_groups": sum(1 for n in dup_sizes.values() if n > 1),
        "duplicate_images": sum(n for n in dup_sizes.values() if n > 1),
        "label_conflict_groups": conflicts,
        "near_duplicates": {
            "threshold": opts.near_dup, "fingerprint": near_duplicates.FINGERPRINT_VERSION, "pairs": near.num_rows,
            "images": len(near_rows),  # images with a near-copy (a different pixel hash), all held in their copies' split
            "groups": len(set(group_ids[i] for i in pairs["i"])),
            "labels_differ": int(sum(labels[int(a)] != labels[int(b)] for a, b in zip(pairs["i"], pairs["j"]))),
        },
        "split_groups": len(set(group_ids)),
        "shards": written,
        "warnings": _class_size_warnings(Counter(labels), class_ids, list(fractions)) + _imbalance_warnings(Counter(labels), class_ids)
        + _mask_like_warnings(excluded),
    }
    if mask_report is not None:  # only datasets ingested with masks have the key (and the shards' mask column)
        summary["masks"] = mask_report.summary()
    shards.write_file(stage, SUMMARY_FILE, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode(), out)
    return summary


def _mask_spec(opts: IngestOptions, source: sources.Source) -> masks.MaskSpec | None:
    """The lesion masks asked for (``--masks``, ``--mask-col``), checked before anything is read; None: no masks."""
    if opts.masks is None and opts.mask_col is None:
        return None
    spec = masks.MaskSpec(Path(opts.masks) if opts.masks else None, opts.mask_col)
    try:
        masks.check_spec(spec, getattr(source, "manifest", None))
    except masks.MaskOptionError as e:
        raise IngestOptionError(str(e)) from None
    return spec


def _attach_masks(kept: list[dict], spec: masks.MaskSpec | None, source: sources.Source) -> masks.MaskReport | None:
    if spec is None:
        return None
    try:
        return masks.attach_masks(kept, spec, getattr(source, "manifest", None), getattr(source, "image_col", None),
                                  getattr(source, "image_root", None))
    except masks.MaskOptionError as e:
        raise IngestOptionError(str(e)) from None


def class_count_lines(summary: dict) -> list[str]:
    """Images per class in each split, one line per split, aligned (what the ingest summary prints)."""
    counts = summary.get("counts") or {}
    names = list(summary.get("classes") or {})
    width = max([len(n) for n in names] + [5])
    lines = [f"  {'':5s} " + " ".join(f"{n:>{width}s}" for n in [*names, "total"])]
    for split, per_class in counts.items():
        lines.append(f"  {split:5s} " + " ".join(f"{per_class.get(n, 0):>{width}d}" for n in [*names, "total"]))
    return lines


def _near_copy_pairs(kept: list[dict], opts: IngestOptions):
    """Pairs of kept rows that are near-copies (different pixel hashes, fingerprint similarity >= --near-dup)."""
    if opts.near_dup is None or not kept:
        return np.empty(0, dtype=near_duplicates.PAIR_DTYPE)
    pairs = near_duplicates.find_near_duplicate_pairs([k["res"].fingerprint for k in kept], opts.near_dup)
    same = np.array([kept[int(a)]["res"].content_hash == kept[int(b)]["res"].content_hash for a, b in zip(pairs["i"], pairs["j"])],
                    dtype=bool)
    return pairs[~same] if len(pairs) else pairs  # pixel-identical copies are counted as duplicates already


def _class_size_warnings(per_class: Counter, class_ids: dict[str, int], split_names: list[str]) -> list[str]:
    """A class with fewer images than splits cannot appear in all of them: train on it and never validate it, or the reverse."""
    need = len(split_names)
    return [
        f"class {name!r} has {per_class.get(cid, 0)} usable image(s); it needs at least {need} to appear in every split "
        f"({', '.join(split_names)}): add images, or leave it out with --classes"
        for name, cid in class_ids.items() if per_class.get(cid, 0) < need
    ]


IMBALANCE_RATIO = 3.0  # largest / smallest class above which training needs class weights to see the small ones


def _imbalance_warnings(per_class: Counter, class_ids: dict[str, int]) -> list[str]:
    """One warning when the largest class has more than ``IMBALANCE_RATIO`` times the images of the smallest:
    unweighted cross-entropy then mostly learns the large class, and accuracy hides it."""
    sizes = {name: per_class.get(cid, 0) for name, cid in class_ids.items() if per_class.get(cid, 0) > 0}
    if len(sizes) < 2:
        return []
    largest, smallest = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
    ratio = sizes[largest] / sizes[smallest]
    if ratio <= IMBALANCE_RATIO:
        return []
    return [f"classes are imbalanced: {largest!r} has {sizes[largest]} images, {smallest!r} {sizes[smallest]} ({ratio:.1f}x); "
            "train with class weights (--set finetune.class_weights=balanced --set pretrain.class_weights=balanced) "
            "and choose the model on val_balanced_accuracy or val_macro_f1"]


def _mask_like_warnings(excluded: exclusions.Excluded) -> list[str]:
    if not excluded.mask_like_kept:
        return []
    return [f"{len(excluded.mask_like_kept)} file(s) named like the mask of an image beside them (e.g. "
            f"{excluded.mask_like_kept[0]}) were ingested as images (--keep-mask-like)"]


def _source_root(source_info: dict) -> Path:
    """The folder ``--exclude`` patterns are relative to: the ImageFolder root or the manifest's image root."""
    return Path(source_info.get("root") or source_info.get("image_root") or ".")


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


def _fingerprint(listing: pl.DataFrame, source: sources.Source, opts: IngestOptions) -> str:
    """Hash of the listing, each file's size and mtime, the manifest bytes and the options.

    Cheap (a stat per file, no decoding), so re-running an ingest whose inputs did not
    change returns at once. Like make, it trusts size + mtime to reveal edits.
    """
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, tool_version(), source.info(), output_options(opts)], sort_keys=True).encode())
    h.update(source.fingerprint_bytes())
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


def _load_if_current(out: Path, fp: str, verify: bool = False, log: Callable[[str], None] = print) -> dict | None:
    """The summary of a dataset in ``out`` that this ingest would write again as it is; None to rebuild.

    ``verify``: every shard's bytes are hashed against the digest recorded at ingest (a shard damaged on
    disk is rebuilt, not trusted); otherwise files are only checked to exist, which is instant."""
    try:
        summary = IngestedDataset.load(out).summary
    except (OSError, ValueError):
        return None
    if summary.get("fingerprint") != fp or not (out / "quarantine.csv").is_file():
        return None
    if not all((out / s["file"]).is_file() for s in summary.get("shards", [])):
        return None
    if verify:
        damaged = [s["file"] for s in summary["shards"] if shards.file_digest(out / s["file"]) != s.get("sha256")]
        if damaged:
            log(f"{len(damaged)} shard(s) of {out} do not match their digests ({', '.join(damaged[:3])}): rebuilding the dataset")
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
    with ProcessPoolExecutor(max_workers=opts.workers, mp_context=get_context("spawn"),
                             initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        return list(bar(pool.map(fn, paths, chunksize=32)))


def _die_with_parent(parent: int) -> None:
    """In each decode process: end when the ingest that started it ends, however it ends (a killed ingest
    would otherwise leave its decoders running, blocked on a queue nobody reads)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        return  # not Linux: the executor's own clean-up is all there is
    if os.getppid() != parent:  # the parent died before the line above ran
        os._exit(1)


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


