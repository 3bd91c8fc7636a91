"""Do the maps find the lesion? Score every map source against the validation lesion masks during one
MSMAE pre-training, and time one refresh of each.

    .venv/bin/python benchmarks/make_bundle.py /tmp/ham_masks --out /tmp/ham-64.pt --side 64 --masks
    .venv/bin/python benchmarks/lesion_maps.py /tmp/ham-64.pt --epochs 6 --out /tmp/lesion_maps.json

One pre-training (``comparison.runner.pretrain``, method ``msmae``: random masking, then SAM by the
maps of ``--map-source``); at every refresh the maps of *every* source (``msmae.MAP_SOURCES``) are
computed on the validation images that have a mask and scored (``msmae.lesion_metrics``): lesion
mass and share, lift, pointing game, patch AUROC, and for the training source the lesion share a SAM
draw shows the encoder and masks. A fixed centre-peaked map is scored too, as the control (dermoscopy
centres the lesion). Each source's time per 100 images is its refresh cost (a refresh
computes maps for every training image). Also printed per epoch: the CLS head's validation balanced
accuracy (does it collapse once SAM starts?). Prints markdown tables; ``--out`` keeps the curve.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import msmae  # noqa: E402
from comparison.bundle import Bundle, load_bundle  # noqa: E402
from comparison.runner import METHODS, Recipe, load_device_data, pretrain  # noqa: E402

SCORES = ("lesion_mass", "lesion_share", "lesion_lift", "lesion_pointing", "lesion_auroc", "lesion_seconds_per_100")


def table(curve: list[dict], sources: tuple[str, ...]) -> str:
    lines = ["| epoch | source | lesion mass | lesion share | lift | pointing | AUROC | s / 100 images |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in curve:
        if not row.get("maps_refreshed"):
            continue
        for source in sources:
            v = [row.get(f"{source}/{k}", float("nan")) for k in SCORES]
            lines.append(f"| {row['epoch']} | {source} | {v[0]:.3f} | {v[1]:.3f} | {v[2]:.2f} | {v[3]:.3f} | {v[4]:.3f} | {v[5]:.2f} |")
    return "\n".join(lines)


def centre_prior(grid: tuple[int, int], sigma: float = 0.25) -> torch.Tensor:
    """``[L]`` a fixed map peaked at the image centre (Gaussian, ``sigma`` in image widths): the control.
    Dermoscopy centres the lesion, so a map that merely prefers the centre scores well without looking."""
    ys = (torch.arange(grid[0]) + 0.5) / grid[0] - 0.5
    xs = (torch.arange(grid[1]) + 0.5) / grid[1] - 0.5
    d2 = ys[:, None] ** 2 + xs[None, :] ** 2
    return torch.exp(-d2 / (2 * sigma**2)).flatten()


def subset(bundle: Bundle, max_train: int | None, max_val: int | None, max_test: int = 50) -> Bundle:
    """The first ``max_train`` training and ``max_val`` validation images (in index order, which is the
    images' ids, not their classes), re-indexed so training rows stay 0..n_train-1: a CPU-sized run."""
    if max_train is None and max_val is None:
        return bundle
    rows = torch.cat([bundle.rows("train")[:max_train], bundle.rows("val")[:max_val], bundle.rows("test")[:max_test]])
    parts = [bundle.encoded(int(i)) for i in rows]
    offsets = torch.cumsum(torch.tensor([0] + [p.numel() for p in parts]), 0)
    return Bundle(bundle.name, bundle.classes, bundle.side, torch.cat(parts), offsets, bundle.label[rows], bundle.split[rows],
                  torch.arange(len(rows)), bundle.aspect[rows], bundle.mask[rows], bundle.has_mask[rows])


def overlay_figures(model: torch.nn.Module, data, classes: list[str], sources: tuple[str, ...], stem: Path) -> list[Path]:
    """Per source, the pipeline's attention-overlay figure (``pipelines.train.plots.attention_figure``: map over the
    image, lesion contour in white, mass on the lesion) of the first validation image of each class that has a lesion."""
    from comparison.augment import normalise
    from pipelines.train.plots import attention_figure, plt

    has = data.val_has_mask.cpu()
    labels = data.val_labels.cpu()
    rows = [int(torch.nonzero((labels == c) & has)[0]) for c in range(len(classes)) if bool(((labels == c) & has).any())]
    images, masks = normalise(data.val[rows]), data.val_masks[rows]
    names = [classes[int(labels[k])] for k in rows]
    paths = []
    model.eval()
    for source in sources:
        path = stem.with_name(f"{stem.stem}-{source}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig = attention_figure(model, images, names, masks=masks, source=source)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path, help="a bundle made with benchmarks/make_bundle.py --masks")
    p.add_argument("--map-source", default="cls_attention", help="the source SAM trains with (default: the paper's)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--img-size", type=int, default=48)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--sam-start", type=int, default=2)
    p.add_argument("--refresh-every", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, help="train on the first N training images only (CPU-sized runs)")
    p.add_argument("--max-val", type=int, help="validate and score maps on the first N validation images only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="write the pre-training curve (every refresh's scores) here as JSON")
    p.add_argument("--figure", type=Path, help="write one PNG per source here (FIGURE-<source>.png): the final model's maps of "
                   "the first validation image of each class with its lesion contour")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = load_bundle(args.bundle)
    if bundle.mask is None:
        raise SystemExit(f"{args.bundle} has no lesion masks: make it with benchmarks/make_bundle.py --masks")
    data = load_device_data(subset(bundle, args.max_train, args.max_val), args.img_size, device)
    sources = tuple(msmae.MAP_SOURCES)
    recipe = Recipe.for_epochs(
        args.epochs, 1, preset=args.preset, img_size=args.img_size, patch_size=args.patch_size, batch_size=args.batch_size,
        eval_batch_size=256, sam_start=args.sam_start, refresh_every=args.refresh_every, class_balance=True,
        map_source=args.map_source, lesion_sources=tuple(s for s in sources if s != args.map_source),
    )
    print(f"{bundle.name}: {data.counts()} images, {int(data.val_has_mask.sum())} val images with masks; "
          f"{recipe.preset} ViT at {args.img_size} px, {args.patch_size} px patches; SAM by {args.map_source} from epoch "
          f"{recipe.sam_start}, refresh every {recipe.refresh_every}; {device}", flush=True)
    start = time.perf_counter()

    def progress(row: dict) -> None:
        lesion = f"  lesion mass {row['lesion_mass']:.3f} lift {row['lesion_lift']:.2f}" if "lesion_mass" in row else ""
        print(f"epoch {row['epoch']} {row['phase']:6s} loss {row['train_loss']:.3f}  CLS head val balanced acc "
              f"{row['val_cls_balanced_accuracy']:.3f}{lesion}  ({row['seconds']:.0f} s)", flush=True)

    has = data.val_has_mask
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size)
    lesion = msmae.lesion_patches(data.val_masks[has].cpu(), preset.patch_size)
    centre = msmae.lesion_scores(centre_prior(preset.grid).repeat(len(lesion), 1), lesion)
    print(f"control, a fixed centre-peaked map (no model): lesion mass {centre.lesion_mass:.3f} of share {centre.lesion_share:.3f}, "
          f"lift {centre.lesion_lift:.2f}, pointing {centre.pointing:.3f}, AUROC {centre.auroc:.3f}", flush=True)
    model, result = pretrain(METHODS["msmae"], recipe, data, args.seed, device, progress)
    print(f"\npre-training {time.perf_counter() - start:.0f} s\n")
    print(table(result.curve, (args.map_source, *recipe.lesion_sources)))
    print("\n| epoch | phase | CLS head val balanced acc | seen lesion share | masked lesion share | table refresh s |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in result.curve:
        print(f"| {row['epoch']} | {row['phase']} | {row['val_cls_balanced_accuracy']:.3f} | {row.get('lesion_seen_share', float('nan')):.3f} "
              f"| {row.get('lesion_masked_share', float('nan')):.3f} | {row.get('refresh_seconds', float('nan')):.1f} |")
    if args.figure:
        for path in overlay_figures(model, data, bundle.classes, sources, args.figure):
            print(f"wrote {path}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "counts": data.counts(),
                                        "centre_control": centre.metrics(), "curve": result.curve}, indent=1))


if __name__ == "__main__":
    main()
