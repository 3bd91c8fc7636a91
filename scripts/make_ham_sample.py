"""Regenerate data/sample/ham10000: 40 HAM10000 images with their lesion masks, downscaled, seeded.

Why: the segmentation tests and demo need real dermoscopy images *with* lesion masks, and tests must
not depend on ../shared. Three classes (nv, mel, bkl; ~13 each, one image per lesion), each image and
mask halved to 100x75 (image bicubic JPEG q85; mask nearest, 1-bit PNG), with a manifest
``metadata.csv`` (lesion_id, image_id, dx) as HAM10000 ships.

    .venv/bin/python scripts/make_ham_sample.py        # from ../shared/datasets/ham10000
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("nv", "mel", "bkl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=REPO.parent / "shared/datasets/ham10000")
    ap.add_argument("--out", type=Path, default=REPO / "data/sample/ham10000")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    meta = args.src / "HAM10000_metadata.csv"
    if not meta.is_file():
        raise SystemExit(f"{meta} not found (expected HAM10000's manifest, images/ and masks/)")
    with open(meta, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["image_id"])
    rng = np.random.default_rng(args.seed)
    chosen = []
    per_class = -(-args.images // len(CLASSES))
    for cls in CLASSES:
        first_per_lesion = {}
        for r in rows:
            if r["dx"] == cls and (args.src / "masks" / f"{r['image_id']}_segmentation.png").is_file():
                first_per_lesion.setdefault(r["lesion_id"], r)
        pool = sorted(first_per_lesion.values(), key=lambda r: r["image_id"])
        chosen += [pool[i] for i in sorted(rng.choice(len(pool), per_class, replace=False))]
    chosen = chosen[: args.images]
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "images").mkdir(parents=True)
    (args.out / "masks").mkdir()
    for r in chosen:
        with Image.open(args.src / "images" / f"{r['image_id']}.jpg") as img:
            size = (round(img.width * args.scale), round(img.height * args.scale))
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(args.out / "images" / f"{r['image_id']}.jpg", quality=85, optimize=True)
        with Image.open(args.src / "masks" / f"{r['image_id']}_segmentation.png") as mask:
            binary = mask.convert("L").resize(size, Image.Resampling.NEAREST).point(lambda v: 255 if v >= 128 else 0).convert("1")
            binary.save(args.out / "masks" / f"{r['image_id']}_segmentation.png", optimize=True)
    with open(args.out / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx"])
        writer.writerows([r["lesion_id"], r["image_id"], r["dx"]] for r in chosen)
    print(f"{len(chosen)} images with masks -> {args.out}")


if __name__ == "__main__":
    main()
