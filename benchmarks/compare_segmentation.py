"""Segmentation transfer: which encoder segments lesions best, at the same budget, over seeds, with paired CIs.

Encoders (each pre-trained by ``comparison.runner`` on the bundle's images, same recipe and epochs):
    msmae_attention  MSMAE pre-training, attention rule (the paper)        = runner method msmae_ft_all
    msmae_uniform    MSMAE pre-training, uniform rule (the released code)  = msmae_uniform_ft_all
    mae              MAE pre-training (random 75 %, MAE's settings)         = mae
    scratch          no pre-training (random encoder)
then the same SETR-PUP head and segmentation recipe (``comparison.segmentation``) on the bundle's masks.

    python benchmarks/make_bundle.py /tmp/ham_masks --out bundles/ham-64.pt --side 64 --masks
    python benchmarks/compare_segmentation.py --bundle bundles/ham-64.pt --preset tiny --img-size 64 --patch-size 8 \\
        --pretrain-epochs 20 --segment-epochs 20 --seeds 0 1 2 --device cuda --out results/ham-seg.json --figure results/ham-seg.png

Prints markdown: test Dice and IoU per encoder (mean ± sd over seeds; 95 % bootstrap CI over images of the per-image
mean over seeds) and the paired difference to ``scratch`` on the same test images; the paired difference of every
pair of encoders, over images and seed by seed; the Dice of the trivial masks (everything / nothing is lesion) on the
same images. Imports torch, timm, numpy, msmae and comparison (matplotlib for ``--figure``; the trivial masks' Dice
from ``pipelines.serve``).

Resumable: ``--out`` is rewritten after every finished run, and a later call with the same settings skips the runs
already in it (with ``--pretrained-dir`` a finished pre-training is reused too), so a long comparison can be stopped
and continued across sessions; only the run in progress is lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENCODERS = {"msmae_attention": "msmae_ft_all", "msmae_uniform": "msmae_uniform_ft_all", "mae": "mae", "scratch": None}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle with masks (benchmarks/make_bundle.py --masks)")
    p.add_argument("--out", type=Path, required=True, help="JSON file of every run's record (per-image scores included)")
    p.add_argument("--figure", type=Path, help="PNG of predicted vs true contours on test images, one row per encoder (first seed)")
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--segment-epochs", type=int, default=20)
    p.add_argument("--segment-blr", type=float, default=1e-3)
    p.add_argument("--class-balance", action="store_true", help="pre-train with a class-balanced CLS loss (imbalanced data, e.g. HAM10000)")
    p.add_argument("--pretrained-dir", type=Path, help="keep pre-trained encoders here (a later call reuses them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


_SETTINGS = ("bundle", "preset", "img_size", "patch_size", "batch_size", "pretrain_epochs", "segment_epochs", "segment_blr", "class_balance")


def settings_of(args: argparse.Namespace) -> dict:
    """What makes two runs of one encoder and seed the same run (a resumed call skips those already in ``--out``)."""
    return {k: str(getattr(args, k)) for k in _SETTINGS}


def read_runs(path: Path) -> list[dict]:
    """Every run already in ``path`` (none when it does not exist yet)."""
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"{path}: not a results file of this script ({e}); move it away or choose another --out") from e


def main(argv: list[str] | None = None) -> dict:
    import torch

    import msmae
    from comparison.bundle import load_bundle
    from comparison.pretrain_store import PretrainCache
    from comparison.runner import METHODS, Recipe, effective_recipe, load_device_data, pretrained_encoder
    from comparison.segmentation import SegmentRecipe, paired_mean_ci, mean_ci, segment_data, train_segmenter

    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bundle = load_bundle(args.bundle)
    recipe = Recipe.for_epochs(args.pretrain_epochs, 1, preset=args.preset, img_size=args.img_size, patch_size=args.patch_size,
                               batch_size=args.batch_size, class_balance=args.class_balance)
    preset = msmae.get_preset(args.preset, args.img_size, args.patch_size)
    device_data = load_device_data(bundle, args.img_size, device) if any(ENCODERS[e] for e in args.encoders) else None
    data = segment_data(bundle, args.img_size, device)
    seg_recipe = SegmentRecipe(epochs=args.segment_epochs, batch_size=args.batch_size, blr=args.segment_blr,
                               warmup=float(max(1, round(0.1 * args.segment_epochs))))
    cache = PretrainCache(directory=args.pretrained_dir) if args.pretrained_dir else PretrainCache()
    if args.pretrained_dir:
        args.pretrained_dir.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    earlier = read_runs(args.out)
    others = [r for r in earlier if r.get("settings") != settings]  # kept in the file, not reused
    done = {(r["encoder"], r["seed"]): r for r in earlier if r.get("settings") == settings}
    if done:
        print(f"{len(done)} runs already in {args.out} with these settings: not run again", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for encoder in args.encoders:
            if (encoder, seed) in done:
                runs.append(done[(encoder, seed)])
                continue
            start = time.perf_counter()
            state = None
            tag = f"[{encoder} s{seed}]"
            if ENCODERS[encoder]:
                method = METHODS[ENCODERS[encoder]]
                state, _, shared = pretrained_encoder(method, effective_recipe(method, recipe), device_data, seed, device, cache=cache,
                                                      progress=lambda row, tag=tag: _print_pretrain(tag, row))
                if shared:
                    print(f"{tag} pre-trained encoder reused from {args.pretrained_dir}", flush=True)
            record = train_segmenter(state, preset, data, seg_recipe, seed, device, progress=lambda row, tag=tag: _print_segment(tag, row, args))
            model = record.pop("model")
            examples = _predict(model, data, 6, seg_recipe.threshold) if seed == args.seeds[0] else None
            runs.append({"encoder": encoder, "seed": seed, "settings": settings, "seconds": time.perf_counter() - start, **record,
                         "examples": None if examples is None else examples.astype(np.uint8).tolist()})
            print(f"{tag} val Dice {record['val']['dice']:.4f}  test Dice {record['test']['dice']:.4f} "
                  f"IoU {record['test']['iou']:.4f}  ({runs[-1]['seconds']:.0f} s)", flush=True)
            _save(args, others + runs, None)
    table = summarise(runs, args.encoders, mean_ci, paired_mean_ci, data.test_masks.float().flatten(1).mean(1).cpu().numpy())
    print(table)
    _save(args, others + runs, table)
    if args.figure:
        first = {r["encoder"]: np.array(r["examples"], dtype=bool) for r in runs if r["seed"] == args.seeds[0] and r.get("examples")}
        _figure(data, first, args.figure)
    return {"runs": runs, "table": table}


def _save(args: argparse.Namespace, runs: list[dict], table: str | None) -> None:
    """Rewrite ``--out`` with ``runs`` (this call's and the earlier ones of other settings), atomically."""
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "table": table}, indent=1))
    tmp.replace(args.out)


def _print_pretrain(tag: str, row: dict) -> None:
    print(f"{tag} pretrain {row['epoch'] + 1}/{row.get('epochs', '?')} {row.get('phase', '')} loss {row['train_loss']:.4f} "
          f"({row.get('seconds', 0):.0f} s)", flush=True)


def _print_segment(tag: str, row: dict, args: argparse.Namespace) -> None:
    print(f"{tag} segment {row['epoch'] + 1}/{args.segment_epochs} loss {row['train_loss']:.4f} val Dice {row['val_dice']:.4f}",
          flush=True)


def per_image(runs: list[dict], encoder: str, key: str) -> np.ndarray:
    """The encoder's per-image score, averaged over its seeds (images in the same order for every encoder)."""
    return np.mean([r["per_image"][key] for r in runs if r["encoder"] == encoder], axis=0)


def summarise(runs: list[dict], encoders: list[str], mean_ci, paired_mean_ci, lesion_share: np.ndarray | None = None) -> str:
    """Three blocks of markdown: per encoder (mean ± sd over seeds, 95 % CI over images of the seed-averaged per-image
    score, the paired difference to ``scratch``); every pair of encoders (paired 95 % CI on the same test
    images, and the difference seed by seed: the CI over images holds the seeds fixed, so a difference smaller than
    the seed-to-seed spread needs the same sign in every seed before it counts); and, given each test image's true
    lesion share, the trivial masks' Dice."""
    seeds = sorted({r["seed"] for r in runs})
    lines = ["| encoder | test Dice, mean ± sd over seeds | [95 % CI over images] | test IoU, mean ± sd | [95 % CI] "
             "| Dice − scratch [95 % CI] | val Dice | seeds |", "|---|---|---|---|---|---|---|---|"]
    for encoder in encoders:
        dice, iou = per_image(runs, encoder, "test_dice"), per_image(runs, encoder, "test_iou")
        d, i = mean_ci(dice), mean_ci(iou)
        by_seed = {k: [r["test"][k] for r in runs if r["encoder"] == encoder] for k in ("dice", "iou")}
        paired = "—"
        if "scratch" in encoders and encoder != "scratch":
            m, lo, hi = paired_mean_ci(dice, per_image(runs, "scratch", "test_dice"))
            paired = f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        val = np.mean([r["val"]["dice"] for r in runs if r["encoder"] == encoder])
        lines.append(f"| {encoder} | {_mean_sd(by_seed['dice'])} | [{d[1]:.4f}, {d[2]:.4f}] | {_mean_sd(by_seed['iou'])} "
                     f"| [{i[1]:.4f}, {i[2]:.4f}] | {paired} | {val:.4f} | {len(by_seed['dice'])} |")
    pairs = [(a, b) for k, a in enumerate(encoders) for b in encoders[k + 1:]]
    if pairs:
        lines += ["", "| pair (same test images) | Δ Dice [95 % CI over images] | Δ IoU [95 % CI] | Δ Dice per seed |",
                  "|---|---|---|---|"]
        test_dice = {(r["encoder"], r["seed"]): r["test"]["dice"] for r in runs}
        for a, b in pairs:
            cells = []
            for key in ("test_dice", "test_iou"):
                m, lo, hi = paired_mean_ci(per_image(runs, a, key), per_image(runs, b, key))
                cells.append(f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
            per_seed = ", ".join(f"{test_dice[a, s] - test_dice[b, s]:+.4f}" for s in seeds if (a, s) in test_dice and (b, s) in test_dice)
            lines.append(f"| {a} − {b} | {cells[0]} | {cells[1]} | {per_seed} |")
    if lesion_share is not None:
        from pipelines.serve.segment_promotion import trivial_dice

        trivial = trivial_dice(lesion_share)
        lines += ["", "Trivial masks on the same test images: " + ", ".join(
            f"{name} Dice {float(np.mean(values)):.4f}" for name, values in trivial.items()) +
            f" (mean lesion share {float(np.mean(lesion_share)):.3f}); seeds {seeds}."]
    return "\n".join(lines)


def _mean_sd(values: list[float]) -> str:
    """``mean ± sd`` over seeds (sd 0 for one seed)."""
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def _predict(model, data, n: int, threshold: float):
    import torch

    from comparison.augment import normalise

    model.eval()
    with torch.no_grad():
        return (torch.sigmoid(model(normalise(data.test[:n]))[:, 0]) > threshold).cpu().numpy()


def _figure(data, examples: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(examples)
    n = examples[names[0]].shape[0]
    fig, axes = plt.subplots(len(names), n, figsize=(2 * n, 2.1 * len(names)), squeeze=False)
    images, truth = data.test[:n].permute(0, 2, 3, 1).cpu().numpy(), data.test_masks[:n].cpu().numpy()
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c])
            ax.contour(truth[c], levels=[0.5], colors=["lime"], linewidths=1)
            if examples[name][c].any():
                ax.contour(examples[name][c], levels=[0.5], colors=["magenta"], linewidths=1, linestyles="--")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("test images: true contour green, predicted magenta (dashed); first seed", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
