"""Pack a folder made by `msmae ingest` into one bundle file for `benchmarks/compare.py`.

    .venv/bin/python benchmarks/make_bundle.py /tmp/cmp_btmd --out bundles/btmd-112.pt --side 112
    .venv/bin/python benchmarks/make_bundle.py /tmp/ham_masks --out bundles/ham-64.pt --side 64 --masks

``--masks`` (a dataset ingested with ``msmae ingest --masks``): each lesion mask is squashed
like its image (nearest) and packed into the bundle, so the runner scores its maps against
the validation masks at every refresh (``comparison.runner.refresh_maps``).

Keeps ingest's splits, labels, class names and dense index (refusing a folder ingested before
near-copies were held in one split: re-ingest it into a fresh folder); every image is squashed to
side × side (bicubic, antialiased, as the pipeline's eval transform squashes it) and
re-encoded as JPEG, so both datasets travel to a GPU box in a few tens of MB and decode
there with torchvision alone. Runs where the data stack is installed (pyarrow).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comparison.bundle import SPLITS, make_bundle, pack_masks, save_bundle  # noqa: E402
from pipelines.data.dataset import IngestedDataset  # noqa: E402


def squash(data: bytes, side: int) -> tuple[torch.Tensor, float]:
    """Stored bytes → uint8 [3, side, side] and the source's width / height."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        aspect = rgb.width / rgb.height
        small = rgb.resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(small).transpose(2, 0, 1).copy()), aspect


def check_near_copies_held_together(dataset: IngestedDataset) -> dict:
    """The ingest's near-copy record, or a clear error for a folder ingested before near-copies
    were held in one split (its splits leak: a near-copy of a test image can sit in training)."""
    near = dataset.summary.get("near_duplicates")
    if not isinstance(near, dict):
        raise SystemExit(f"{dataset.path}: ingested without the near-copy table (no 'near_duplicates' in dataset.json), so near-copies "
                         "may straddle train / val / test; re-ingest into a fresh folder with this version's `msmae ingest`")
    return near


def squash_mask(data: bytes | None, side: int) -> torch.Tensor | None:
    """Stored mask bytes -> bool [side, side], nearest (None: the image has no mask)."""
    if data is None:
        return None
    with Image.open(io.BytesIO(data)) as img:
        return torch.from_numpy(np.asarray(img.convert("L").resize((side, side), Image.NEAREST)) > 0)


def build(data_dir: Path, out: Path, side: int, quality: int, name: str | None, with_masks: bool = False) -> dict:
    dataset = IngestedDataset.load(data_dir)
    near = check_near_copies_held_together(dataset)
    if with_masks and not dataset.has_masks:
        raise SystemExit(f"{data_dir} was ingested without lesion masks: re-run `msmae ingest ... --masks DIR`")
    classes = dataset.class_names
    images, labels, splits, index, aspect, masks = [], [], [], [], [], []
    columns = ["image", "label", "index"] + (["mask"] if with_masks else [])
    for split in SPLITS:
        for path in dataset.shard_files(split):
            table = pq.read_table(path, columns=columns)
            stored_masks = table.column("mask").to_pylist() if with_masks else [None] * table.num_rows
            for data, label, idx, mask in zip(table.column("image").to_pylist(), table.column("label").to_pylist(),
                                              table.column("index").to_pylist(), stored_masks, strict=True):
                masks.append(squash_mask(mask, side))
                img, a = squash(data, side)
                images.append(img)
                labels.append(label)
                splits.append(split)
                index.append(idx)
                aspect.append(a)
    bundle = make_bundle(name or data_dir.name, classes, images, labels, splits, index, aspect, quality)
    if with_masks:
        bundle.mask, bundle.has_mask = pack_masks(masks, side)
    order = torch.argsort(bundle.index)
    if not torch.equal(bundle.index[order], torch.arange(len(bundle))):
        raise ValueError(f"{data_dir}: the ingested index is not dense 0..N-1")
    save_bundle(bundle, out)
    return {"out": str(out), "images": len(bundle), "counts": bundle.counts(), "classes": classes,
            "masks": int(bundle.has_mask.sum()) if with_masks else 0, "mib": round(out.stat().st_size / 2**20, 2), "near_duplicates": near}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="a folder made by `msmae ingest` (with val and test splits)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--side", type=int, default=112, help="stored image side in pixels (default 112)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--name", help="dataset name recorded in results (default: the folder name)")
    parser.add_argument("--masks", action="store_true", help="pack the lesion masks too (a dataset ingested with --masks)")
    args = parser.parse_args()
    start = time.perf_counter()
    summary = build(args.data_dir, args.out, args.side, args.quality, args.name, args.masks)
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
