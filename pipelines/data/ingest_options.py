"""What ``msmae ingest`` is asked to do: its options, checked before anything is read, and its errors.

``msmae run`` and ``msmae evaluate`` ingest too, so the checks live here rather than in the CLI.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from pipelines.data import images, near_duplicates, splits


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
    near_dup: float | None = near_duplicates.DEFAULT_THRESHOLD  # fingerprint similarity that joins near-copies; None: off
    verify: bool = False  # check the shards' sha256 before calling an existing dataset up to date (repairs a damaged one)
    masks: str | None = None  # folder of <image_id>_segmentation.png lesion masks (pipelines.data.masks)
    mask_col: str | None = None  # manifest column naming each image's mask file
    exclude: tuple[str, ...] = ()  # globs of paths (relative to the source root) left out, listed in excluded.csv
    keep_mask_like: bool = False  # ingest files named like the mask of an image beside them as images too
    workers: int = field(default_factory=usable_cpus, compare=False)



RUN_ONLY_OPTIONS = ("workers", "strict", "force", "verify")  # how ingest runs, not what it writes


def check_options(opts: IngestOptions) -> dict[str, float]:
    """Refuse options that would write a wrong or empty dataset, before anything is read; returns the split fractions.

    Why here and not only in the CLI: ``msmae run`` and ``msmae evaluate`` ingest too.
    """
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise IngestOptionError(message)

    need(opts.mode in images.SUPPORTED_MODES, f"--mode must be one of {', '.join(images.SUPPORTED_MODES)}, got {opts.mode!r}")
    need(opts.rows_per_shard >= 1, f"--rows-per-shard must be at least 1, got {opts.rows_per_shard}")
    need(opts.workers >= 1, f"--decode-workers must be at least 1, got {opts.workers}")
    need(all(p.strip() for p in opts.exclude), "--exclude needs a glob pattern, got an empty one")
    need(opts.min_side >= 1, f"--min-side must be at least 1 pixel, got {opts.min_side}")
    need(opts.near_dup is None or 0.5 <= opts.near_dup <= 1.0,
         f"--near-dup must be a similarity between 0.5 and 1.0 (default {near_duplicates.DEFAULT_THRESHOLD}), got {opts.near_dup}")
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


MASK_OPTIONS = ("masks", "mask_col")  # recorded only when given: datasets without masks keep their fingerprints


def output_options(opts: IngestOptions) -> dict:
    return {k: v for k, v in asdict(opts).items() if k not in RUN_ONLY_OPTIONS and not (k in MASK_OPTIONS and v is None)}
