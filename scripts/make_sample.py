"""Regenerate data/sample/btmd: a small, downscaled, seeded subset of BTMD's training part.

Why a sample: the demo and the tests need real MRI slices, but the full dataset is neither
ours to redistribute in bulk nor small. Each class gets up to --per-class images, 96×96
JPEG (the demo trains at 64 px). A few of BTMD's byte-identical duplicate groups are kept
whole, and every member of a group is written with the same output bytes, so ingest's
de-duplication has real duplicates to find.

    .venv/bin/python scripts/make_sample.py            # from ../shared/datasets/btmd/Training
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def shrink(path: Path, side: int, quality: int) -> bytes:
    """Square resize to side×side; grayscale slices stay grayscale (as in the source)."""
    with Image.open(path) as img:
        img = img.convert("L" if img.mode in ("L", "LA", "I;16") else "RGB")
        img = img.resize((side, side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality, optimize=True)
        return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared/datasets/btmd/Training")
    ap.add_argument("--out", type=Path, default=REPO / "data/sample/btmd")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--dup-groups-per-class", type=int, default=2)
    ap.add_argument("--side", type=int, default=96)
    ap.add_argument("--quality", type=int, default=85)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if not args.src.is_dir():
        raise SystemExit(f"source {args.src} not found (expected BTMD's Training/<class>/ folders)")
    rng = np.random.default_rng(args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for cls_dir in sorted(p for p in args.src.iterdir() if p.is_dir()):
        files = sorted(p for p in cls_dir.iterdir() if p.is_file())
        by_md5: dict[str, list[Path]] = defaultdict(list)
        for f in files:
            by_md5[hashlib.md5(f.read_bytes()).hexdigest()].append(f)
        dup_groups = sorted((g for g in by_md5.values() if len(g) > 1), key=lambda g: g[0].name)
        chosen_groups = [dup_groups[i] for i in sorted(rng.permutation(len(dup_groups))[: args.dup_groups_per_class])]
        chosen = [f for g in chosen_groups for f in g]
        # singles only: a random pick must not bring in half of another duplicate group
        singles = [g[0] for g in by_md5.values() if len(g) == 1]
        singles.sort()
        need = args.per_class - len(chosen)
        chosen += [singles[i] for i in sorted(rng.permutation(len(singles))[:need])]

        out_dir = args.out / cls_dir.name
        out_dir.mkdir(parents=True)
        encoded: dict[str, bytes] = {}
        for f in chosen:
            key = hashlib.md5(f.read_bytes()).hexdigest()
            data = encoded.setdefault(key, shrink(f, args.side, args.quality))
            (out_dir / f.name).write_bytes(data)
            total += len(data)
        print(f"{cls_dir.name}: {len(chosen)} images ({len(chosen_groups)} duplicate groups, "
              f"{sum(len(g) for g in chosen_groups)} images in them)")
    print(f"total {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
