"""How many held-out images of a split have a training near-copy: the audit behind docs/results.md's notes.

    .venv/bin/python benchmarks/leak_audit.py SRC [--manifest-group COL] --val 0.15 --test 0.15 --seed 0

Ingests SRC twice into a temporary folder — with pixel-identical grouping only (how the split behind
the existing tables was made) and with near-copies held together (ingest's default now) — and for each
prints, per held-out split, how many images have a training image at fingerprint similarity >= 0.98.
``--extra DIR``: also count how many images of an ImageFolder DIR (e.g. images evaluated as "unseen")
are near-copies of the first ingest's training and validation images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.data import near_duplicates as nd  # noqa: E402
from pipelines.data.ingest import IngestOptions, ingest  # noqa: E402
from pipelines.data.sources import ManifestSpec  # noqa: E402


def audit(dataset) -> dict[str, int]:
    _, train = dataset.fingerprints(("train",))
    out = {}
    for split in dataset.non_empty_splits():
        if split == "train":
            continue
        _, held = dataset.fingerprints((split,))
        out[split] = f"{int(nd.seen_in(train, held).sum())} of {len(held)}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="ImageFolder root, or a manifest (.csv) with --image-root")
    parser.add_argument("--image-root", type=Path)
    parser.add_argument("--image-col", default="image_id")
    parser.add_argument("--label-col", default="dx")
    parser.add_argument("--group-col")
    parser.add_argument("--val", type=float, default=0.15)
    parser.add_argument("--test", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", type=Path, help="an ImageFolder whose images are checked against the training+validation images")
    args = parser.parse_args()
    src = ManifestSpec(args.src, args.image_root, args.image_col, args.label_col, args.group_col) if args.image_root else args.src
    with tempfile.TemporaryDirectory(prefix="msmae-leak-") as tmp:
        for name, near_dup in (("pixel-identical groups only", None), ("near-copies held together", nd.DEFAULT_THRESHOLD)):
            start = time.perf_counter()
            result = ingest(src, Path(tmp) / name.split()[0], IngestOptions(val=args.val, test=args.test, seed=args.seed, near_dup=near_dup),
                            progress=False, log=lambda _: None)
            sizes = " / ".join(str(result.dataset.split_size(s)) for s in result.dataset.non_empty_splits())
            print(f"{name}: split {sizes}; held-out images with a training near-copy: {audit(result.dataset)} "
                  f"({time.perf_counter() - start:.1f} s)")
            if args.extra and near_dup is None:
                _, seen = result.dataset.fingerprints(("train", "val"))
                extra = ingest(args.extra, Path(tmp) / "extra", IngestOptions(val=0.0, near_dup=None), progress=False, log=lambda _: None)
                _, fps = extra.dataset.fingerprints(("train",))
                print(f"  {args.extra}: {int(nd.seen_in(seen, fps).sum())} of {len(fps)} images are near-copies of the training or validation images")


if __name__ == "__main__":
    main()
