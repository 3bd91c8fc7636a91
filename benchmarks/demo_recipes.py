"""Try recipes for the demo quickly: the comparison runner on the demo's own data, judged on unseen BTMD images.

    .venv/bin/python benchmarks/demo_recipes.py bundle --out bundles/demo-96.pt
    .venv/bin/python benchmarks/demo_recipes.py run --bundle bundles/demo-96.pt \\
        --recipe '{"layer_decay": 1.0, "finetune_blr": 3e-3}' --pretrain attention --finetune all

The bundle holds the demo's train / val split of the bundled sample (ingested as `msmae run`
ingests it: val 0.2, seed 0) at 96 px and, as its test split, 200 images per class of BTMD's
training part that are *not* in the sample (seeded). A run trains one MSMAE variant in one
process (no Ray: a few minutes instead of the demo's ten) and prints one JSON line: validation
accuracy of the selected epoch, accuracy on the unseen images, the curves, and the map-quality
lift at each refresh. What it finds still has to be confirmed by the demo itself and
`benchmarks/demo_unseen.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comparison.bundle import load_bundle, make_bundle, save_bundle  # noqa: E402
from comparison.runner import Method, Recipe, load_device_data, run_method  # noqa: E402


def squash(img: Image.Image, side: int) -> tuple[torch.Tensor, float]:
    rgb = img.convert("RGB")
    return torch.from_numpy(np.asarray(rgb.resize((side, side), Image.BICUBIC)).transpose(2, 0, 1).copy()), rgb.width / rgb.height


def build_bundle(sample: Path, source: Path, out: Path, side: int, unseen_per_class: int) -> dict:
    import pyarrow.parquet as pq

    from pipelines.data.dataset import IngestedDataset
    from pipelines.data.ingest import IngestOptions, ingest

    rows: list[tuple[torch.Tensor, int, str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ingest(sample, Path(tmp) / "data", IngestOptions(val=0.2, test=0.0, seed=0, workers=1), progress=False, log=lambda _: None)
        dataset = IngestedDataset.load(Path(tmp) / "data")
        classes = dataset.class_names
        for split in ("train", "val"):
            for shard in dataset.shard_files(split):
                for r in pq.read_table(shard, columns=["image", "label"]).to_pylist():
                    img, aspect = squash(Image.open(io.BytesIO(r["image"])), side)
                    rows.append((img, r["label"], split, aspect))
    seen = {p.name for p in sample.rglob("*") if p.is_file()}
    rng = random.Random(0)
    for label, name in enumerate(classes):
        files = sorted(p for p in (source / name).glob("*") if p.name not in seen)
        for path in rng.sample(files, unseen_per_class):
            img, aspect = squash(Image.open(path), side)
            rows.append((img, label, "test", aspect))
    images, labels, splits, aspects = zip(*rows)
    bundle = make_bundle("btmd-demo", classes, list(images), list(labels), list(splits), None, list(aspects))
    save_bundle(bundle, out)
    return {"out": str(out), "counts": bundle.counts()}


def run(bundle_path: Path, recipe_json: str, pretrain_strategy: str, finetune_strategy: str, seed: int) -> dict:
    overrides = json.loads(recipe_json)
    epochs = overrides.pop("pretrain_epochs", 20), overrides.pop("finetune_epochs", 20)
    recipe = Recipe.for_epochs(*epochs, **{"preset": "tiny", "img_size": 64, "patch_size": 8, "batch_size": 64,
                                           "eval_batch_size": 256, **overrides})
    method = Method("demo", "msmae", finetune_strategy, pretrain_strategy=pretrain_strategy)
    data = load_device_data(load_bundle(bundle_path), recipe.img_size, "cpu")
    start = time.time()
    record = run_method(method, recipe, data, seed, "cpu")
    curve = record["pretrain_curve"] + record["finetune_curve"]
    return {
        "pretrain": pretrain_strategy, "finetune": finetune_strategy, "recipe": overrides, "epochs": list(epochs), "seed": seed,
        "selected_epoch": record["selected_epoch"], "val_accuracy": round(record["val"]["accuracy"], 3),
        "unseen_accuracy": round(record["test"]["accuracy"], 3), "unseen_balanced_accuracy": round(record["test"]["balanced_accuracy"], 3),
        "seconds": round(time.time() - start), "val_curve": [round(r["val_accuracy"], 2) for r in record["finetune_curve"]],
        "map_foreground_lift": [round(r["map_foreground_lift"], 2) for r in curve if "map_foreground_lift" in r],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bundle")
    b.add_argument("--sample", type=Path, default=ROOT / "data/sample/btmd")
    b.add_argument("--source", type=Path, default=ROOT.parent / "shared/datasets/btmd/Training")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--side", type=int, default=96)
    b.add_argument("--unseen-per-class", type=int, default=200)
    r = sub.add_parser("run")
    r.add_argument("--bundle", type=Path, required=True)
    r.add_argument("--recipe", default="{}", help="JSON of comparison.runner.Recipe fields (and pretrain_epochs / finetune_epochs)")
    r.add_argument("--pretrain", default="attention", choices=["attention", "uniform"])
    r.add_argument("--finetune", default="all", choices=["attention", "uniform", "all"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "bundle":
        print(json.dumps(build_bundle(args.sample, args.source, args.out, args.side, args.unseen_per_class)))
    else:
        torch.set_num_threads(args.threads)
        print(json.dumps(run(args.bundle, args.recipe, args.pretrain, args.finetune, args.seed)))


if __name__ == "__main__":
    main()
