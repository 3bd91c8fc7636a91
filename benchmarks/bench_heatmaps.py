"""Occlusion heatmaps: images/s of the ways to compute and draw them, measured in one run on the same model and images.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_heatmaps.py [--images 32] [--rounds 3] [--preset tiny]

Maps (``pipelines.serve.explain.occlusion_maps``, L = 64 occluded forward passes an image for the demo's tiny ViT):
- ``one image at a time``: the maps of each image alone (L sequences a forward batch), as the issue described;
- ``batched, 256 sequences`` : every (image, left-out patch) pair stacked, 256 a forward batch (the code before this change);
- ``batched, memory cap``: the same, as many a forward batch as ``explain.occlusion_batch`` allows (now);
- ``batched, N sequences``: a sweep of the forward batch size, to show where the cap sits.
Figures:
- ``matplotlib figure (64 px input)``: the figure ``msmae predict --heatmaps`` drew before (a copy of it is below);
- ``PIL figure (original size)``: ``pipelines.serve.heatmap_figures.render`` over the decoded original (now).
And per image, maps + figure: before (256-sequence batches + matplotlib) and now (memory cap + PIL).

The model is the demo's architecture with random weights (the cost does not depend on the weights); the
images are the first N of the bundled sample. Rounds are interleaved and the best round of each path is
reported (the machine is shared; the best round is the one least disturbed), the ratio against the first row
of its table. Also checks that every batched variant gives the maps of one image at a time (max abs difference).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import msmae  # noqa: E402
from pipelines.data import images  # noqa: E402
from pipelines.data.preprocessing import Preprocessing  # noqa: E402
from pipelines.serve import explain, heatmap_figures  # noqa: E402


def old_matplotlib_figure(path: Path, rgb: np.ndarray, grid: np.ndarray, title: str) -> None:
    """The figure ``msmae predict --heatmaps`` drew before: the 64 px network input, its own colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(np.abs(grid).max()) or 1e-6
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(rgb)
    axes[1].imshow(rgb)
    shown = axes[1].imshow(grid, cmap="bwr", alpha=0.55, vmin=-limit, vmax=limit, extent=(0, rgb.shape[1], rgb.shape[0], 0),
                           interpolation="nearest")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label="probability drop without the patch")
    fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--sweep", default="64,128,512", help="extra forward batch sizes (sequences) to time")
    args = parser.parse_args()

    torch.manual_seed(0)
    preset = msmae.PRESETS[args.preset]
    model = msmae.build_classifier(preset, 4, drop_path_rate=0.0).eval()
    files = sorted((REPO / "data" / "sample" / "btmd").glob("*/*"))[:args.images]
    recipe = Preprocessing(img_size=preset.img_size)
    originals = [images.load_image(f, "RGB") for f in files]
    pixels = torch.from_numpy(np.stack([recipe.pixels(im) for im in originals]))
    inputs_64 = [np.asarray(im.convert("RGB").resize((preset.img_size,) * 2)) for im in originals]
    n, cap = len(files), explain.occlusion_batch(preset)

    maps = {
        "one image at a time": lambda: torch.cat([explain.occlusion_maps(model, pixels[k:k + 1], chunk=preset.num_patches)[0] for k in range(n)]),
        "batched, 256 sequences (before)": lambda: explain.occlusion_maps(model, pixels, chunk=256)[0],
        f"batched, memory cap ({cap} sequences, now)": lambda: explain.occlusion_maps(model, pixels)[0],
        **{f"batched, {c} sequences": (lambda c=c: explain.occlusion_maps(model, pixels, chunk=c)[0])
           for c in (int(s) for s in args.sweep.split(",") if s) if c not in (256, cap)},
    }
    reference = maps["one image at a time"]()
    differences = {name: float((fn() - reference).abs().max()) for name, fn in maps.items()}
    grids = explain.as_grid(reference, preset)
    limit = heatmap_figures.shared_limit(list(grids))

    with tempfile.TemporaryDirectory(prefix="bench-heatmaps-") as tmp:
        out = Path(tmp)
        figures = {
            "matplotlib figure, 64 px input (before)": lambda: [old_matplotlib_figure(out / f"old{k}.png", inputs_64[k], grids[k], "t") for k in range(n)],
            "PIL figure, original size (now)": lambda: [heatmap_figures.save(out / f"new{k}.png", heatmap_figures.render(
                originals[k], grids[k], limit, "glioma 0.83", "note")) for k in range(n)],
        }
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, fn in {**maps, **figures}.items():
                best[name] = min(best.get(name, float("inf")), timed(fn))

    first_map, first_fig = next(iter(maps)), next(iter(figures))
    print(f"{n} images, {args.preset} preset ({preset.img_size} px, {preset.num_patches} patches), "
          f"{torch.get_num_threads()} torch threads, best of {args.rounds} interleaved rounds\n")
    print(f"{'occlusion maps':<44}{'images/s':>10}{'ratio':>8}{'max |diff|':>12}")
    for name in maps:
        print(f"{name:<44}{n / best[name]:>10.2f}{best[first_map] / best[name]:>7.2f}x{differences[name]:>12.1e}")
    print(f"\n{'figures':<44}{'images/s':>10}{'ratio':>8}")
    for name in figures:
        print(f"{name:<44}{n / best[name]:>10.2f}{best[first_fig] / best[name]:>7.2f}x")
    before = best["batched, 256 sequences (before)"] + best[first_fig]
    now = best[f"batched, memory cap ({cap} sequences, now)"] + best["PIL figure, original size (now)"]
    print(f"\n{'maps + figure, per image':<44}{'images/s':>10}{'ratio':>8}")
    print(f"{'before (256 sequences + matplotlib)':<44}{n / before:>10.2f}{1.0:>7.2f}x")
    print(f"{'now (memory cap + PIL)':<44}{n / now:>10.2f}{before / now:>7.2f}x")


if __name__ == "__main__":
    main()
