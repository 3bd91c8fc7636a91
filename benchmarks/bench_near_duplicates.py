"""Benchmark and calibration of pipelines/data/near_duplicates.py (issue 25).

Synthetic (default): N cheap grey images (random Gaussian blobs on a noisy texture, 64 px) of
which --planted are near-copies of other images in the set (JPEG re-encode, resize, 1 px crop
per side, brightness offset / gain); prints fingerprint time per image, search time, pairs
found, recall on the planted copies and false joins.

    nice -n 10 .venv/bin/python benchmarks/bench_near_duplicates.py --n 100000

Real data (--btmd DIR, an ImageFolder such as ../shared/datasets/btmd/Training): fingerprint
time per 224 px JPEG, search time, and, at several thresholds, the pairs found against an
independent measure (Pearson correlation of 32×32 bilinear grey thumbnails > 0.99 between
images whose pixels differ), planted-transform recall on a sample, and group sizes. --grid
writes a PNG of example pairs just inside and just outside the default threshold.

    nice -n 10 .venv/bin/python benchmarks/bench_near_duplicates.py --btmd ../shared/datasets/btmd/Training \\
        --grid docs/images/near-dup-pairs.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.data import near_duplicates as nd  # noqa: E402

THRESHOLDS = (0.97, 0.975, 0.98, 0.985, 0.99)


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert(img.mode)


def edits(side: int) -> dict:
    """The near-copy edits, for images of about `side` px (crop: ~1 % of the side, 2 px at 224)."""
    c = max(1, round(side / 112))
    return {
        "jpeg q30": lambda im: jpeg(im, 30),
        "resize 1/2": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BILINEAR),
        "resize x2": lambda im: im.resize((im.width * 2, im.height * 2), Image.Resampling.BICUBIC),
        f"crop {c}px/side": lambda im: im.crop((c, c, im.width - c, im.height - c)),
        f"shift {c}px": lambda im: im.crop((c, c, im.width, im.height)),
        "brightness +20": lambda im: Image.fromarray(np.clip(np.asarray(im, np.int16) + 20, 0, 255).astype(np.uint8)),
        "brightness x1.2": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
        "crop+resize+jpeg": lambda im: jpeg(im.crop((c, c, im.width - c, im.height - c)).resize((im.width * 2 // 3, im.height * 2 // 3), Image.Resampling.BILINEAR), 60),
    }


# ---------------------------------------------------------------------------- synthetic


def synthetic_images(n: int, side: int, seed: int) -> np.ndarray:
    """n grey uint8 images: 3-8 Gaussian blobs of random size/brightness on a smoothed noise texture."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, side, side), dtype=np.uint8)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    for b0 in range(0, n, 1000):
        m = min(1000, n - b0)
        img = np.zeros((m, side, side), np.float32)
        for _ in range(8):
            on = rng.random(m) < 0.7
            cx, cy = rng.random(m), rng.random(m)
            sx, sy = 0.04 + 0.2 * rng.random(m), 0.04 + 0.2 * rng.random(m)
            amp = (rng.random(m) * 2 - 0.6) * on
            img += amp[:, None, None] * np.exp(-(((xx - cx[:, None, None]) / sx[:, None, None]) ** 2 + ((yy - cy[:, None, None]) / sy[:, None, None]) ** 2))
        noise = rng.standard_normal((m, side // 4, side // 4)).astype(np.float32)
        noise = np.repeat(np.repeat(noise, 4, axis=1), 4, axis=2) * 0.08  # blocky texture
        img = img + noise
        lo, hi = img.min(axis=(1, 2), keepdims=True), img.max(axis=(1, 2), keepdims=True)
        out[b0:b0 + m] = np.round((img - lo) / np.maximum(hi - lo, 1e-6) * 235 + 10).astype(np.uint8)
    return out


def run_synthetic(args: argparse.Namespace) -> None:
    side = args.side
    n_orig = args.n - args.planted
    t0 = time.perf_counter()
    base = synthetic_images(n_orig, side, args.seed)
    t_gen = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed + 1)
    ed = edits(side)
    names = list(ed)
    src = rng.choice(n_orig, args.planted, replace=False)
    kind = rng.integers(0, len(names), args.planted)
    t0 = time.perf_counter()
    copies = [ed[names[k]](Image.fromarray(base[s])) for s, k in zip(src, kind, strict=True)]
    t_edit = time.perf_counter() - t0

    t0 = time.perf_counter()
    fps = np.empty((args.n, nd.FINGERPRINT_BYTES), dtype=np.int8)
    for i in range(n_orig):
        fps[i] = nd.fingerprint(Image.fromarray(base[i]))
    for k, im in enumerate(copies):
        fps[n_orig + k] = nd.fingerprint(im)
    t_fp = time.perf_counter() - t0

    # per-edit similarity to the original (before the search: the search itself is timed alone)
    u = fps.astype(np.float32)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-9)
    sim_planted = (u[src] * u[n_orig:]).sum(1)

    t0, c0 = time.perf_counter(), time.process_time()
    pairs = nd.find_near_duplicate_pairs(fps, args.threshold)
    t_search, c_search = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    groups = nd.near_duplicate_groups(args.n, pairs)
    t_groups = time.perf_counter() - t0

    origin = np.arange(args.n)
    origin[n_orig:] = src  # a planted copy belongs to its original
    truth = origin[pairs["i"]] == origin[pairs["j"]]
    recovered = groups[n_orig:] == groups[src]
    print(f"synthetic: {args.n:,} images ({n_orig:,} originals + {args.planted:,} planted copies), {side}x{side} grey; "
          f"threshold {args.threshold}; generated in {t_gen:.1f} s, edits {t_edit:.1f} s")
    print()
    print("| step | result |")
    print("|---|---|")
    print(f"| fingerprint ({side} px image, in memory) | {t_fp / args.n * 1e6:.0f} µs/image ({t_fp:.1f} s) |")
    print(f"| pair search (`find_near_duplicate_pairs`) | {t_search:.1f} s wall, {c_search:.1f} s CPU (all threads) |")
    print(f"| union-find (`near_duplicate_groups`) | {t_groups:.2f} s |")
    print(f"| pairs found | {len(pairs):,} ({int(truth.sum()):,} planted, {int((~truth).sum()):,} false joins) |")
    print(f"| planted copies joined to their original | {int(recovered.sum()):,} / {args.planted:,} ({recovered.mean():.2%}) |")
    print()
    print("| edit | planted | joined | min similarity | 1st percentile |")
    print("|---|---:|---:|---:|---:|")
    for k, name in enumerate(names):
        m = kind == k
        print(f"| {name} | {int(m.sum())} | {int(recovered[m].sum())} | {sim_planted[m].min():.4f} | {np.percentile(sim_planted[m], 1):.4f} |")
    if (~truth).any():
        print(f"false-join similarities: max {pairs['similarity'][~truth].max():.4f}")


# ---------------------------------------------------------------------------- BTMD


def load_folder(root: Path) -> tuple[list[Path], list[Image.Image], list[str]]:
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    imgs, hashes = [], []
    for p in paths:
        with Image.open(p) as im:
            rgb = im.convert("RGB")  # ingest's normalised pixels (mode RGB): the pixel hash's input
        hashes.append(hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest())
        imgs.append(rgb)
    return paths, imgs, hashes


def corr32(imgs: list[Image.Image]) -> np.ndarray:
    """The independent measure: Pearson correlation of 32×32 bilinear grey thumbnails (float64)."""
    x = np.stack([np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), np.float64).ravel() for im in imgs])
    x -= x.mean(1, keepdims=True)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
    return x @ x.T


def run_btmd(args: argparse.Namespace) -> None:
    root = Path(args.btmd)
    paths, imgs, hashes = load_folder(root)
    n = len(imgs)
    # fingerprint time: decode of a 224 px JPEG + fingerprint, and fingerprint alone
    sample = paths[: min(500, n)]
    t0 = time.perf_counter()
    for p in sample:
        with Image.open(p) as im:
            nd.fingerprint(im.convert("RGB"))
    t_decode_fp = (time.perf_counter() - t0) / len(sample)
    t0 = time.perf_counter()
    fps = nd.fingerprints(imgs)
    t_fp = (time.perf_counter() - t0) / n
    t0, c0 = time.perf_counter(), time.process_time()
    pairs_all = nd.find_near_duplicate_pairs(fps, min(THRESHOLDS) - 0.02)
    t_search, c_search = time.perf_counter() - t0, time.process_time() - c0
    h = np.array(hashes)
    pairs_all = pairs_all[h[pairs_all["i"]] != h[pairs_all["j"]]]  # pixel-identical pairs are joined already

    C = corr32(imgs)
    iu = np.triu_indices(n, 1)
    cross = (C[iu] > 0.99) & (h[iu[0]] != h[iu[1]])
    ref = set(zip(iu[0][cross].tolist(), iu[1][cross].tolist(), strict=True))
    c = C[pairs_all["i"], pairs_all["j"]]
    print(f"{root}: {n:,} images, {len(set(hashes)):,} distinct pixel hashes; {nd.FINGERPRINT_BYTES} bytes/fingerprint")
    print(f"fingerprint: {t_fp * 1e6:.0f} µs/image (decoded 224 px), {t_decode_fp * 1e3:.2f} ms/image with the JPEG decode; "
          f"search of {n:,}: {t_search:.2f} s wall, {c_search:.2f} s CPU")
    print(f"independent measure (32x32 grey correlation > 0.99, pixels differ): {len(ref):,} pairs")
    print()
    print("| threshold | pairs (pixels differ) | of the independent measure's pairs | found, corr32 ≤ 0.99: 0.98-0.99 / 0.95-0.98 / < 0.95 | images in a near-dup group | largest group |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in THRESHOLDS:
        m = pairs_all["similarity"] >= t
        got = set(zip(pairs_all["i"][m].tolist(), pairs_all["j"][m].tolist(), strict=True))
        cm = c[m]
        g = nd.near_duplicate_groups(n, pairs_all[m], base_groups=hashes)
        sizes = np.bincount(g, minlength=n)
        in_groups = int((sizes[g] > 1).sum())
        print(f"| {t} | {int(m.sum()):,} | {len(got & ref):,} / {len(ref):,} ({len(got & ref) / max(len(ref), 1):.1%}) | "
              f"{int(((cm > 0.98) & (cm <= 0.99)).sum()):,} / {int(((cm >= 0.95) & (cm <= 0.98)).sum()):,} / {int((cm < 0.95).sum()):,} | {in_groups:,} | {int(sizes.max())} |")

    # planted edits on a sample of the real images
    rng = np.random.default_rng(0)
    idx = rng.choice(n, min(args.sample, n), replace=False)
    print()
    print(f"planted edits of {len(idx)} images (grey, {imgs[0].width} px): similarity to the original")
    print("| edit | min | 1st percentile | " + " | ".join(f"joined at {t}" for t in THRESHOLDS) + " |")
    print("|---|---:|---:|" + "---:|" * len(THRESHOLDS))
    for name, f in edits(imgs[0].width).items():
        s = np.array([nd.similarity(fps[i], nd.fingerprint(f(imgs[i].convert("L")))) for i in idx])
        print(f"| {name} | {s.min():.4f} | {np.percentile(s, 1):.4f} | " + " | ".join(f"{(s >= t).mean():.1%}" for t in THRESHOLDS) + " |")

    # different images nearest to a copy: each image's best match among images whose corr32 < 0.95
    if args.grid:
        write_grid(Path(args.grid), imgs, pairs_all, C, rng)


def write_grid(out: Path, imgs: list[Image.Image], pairs: np.ndarray, C: np.ndarray, rng: np.random.Generator) -> None:
    """Rows of pairs: 4 just inside the default threshold, 4 just outside (random picks)."""
    t = nd.DEFAULT_THRESHOLD
    s = pairs["similarity"]
    bands = [(f"just inside: {t} <= sim < {t + 0.005:.3f}", (s >= t) & (s < t + 0.005)),
             (f"just outside: {t - 0.005:.3f} <= sim < {t}", (s >= t - 0.005) & (s < t))]
    side, per_row, pad, head = 96, 4, 8, 14
    width = per_row * (2 * side + pad)
    canvas = Image.new("L", (width, len(bands) * 2 * (side + head) + 2 * 18), 255)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for title, m in bands:
        draw.text((2, y + 2), title, fill=0)
        y += 18
        pick = rng.choice(np.nonzero(m)[0], min(2 * per_row, int(m.sum())), replace=False)
        for k, p in enumerate(pick):
            i, j = int(pairs["i"][p]), int(pairs["j"][p])
            x = (k % per_row) * (2 * side + pad)
            yy = y + (k // per_row) * (side + head)
            draw.text((x + 2, yy), f"sim {s[p]:.4f}  r32 {C[i, j]:.3f}", fill=0)
            canvas.paste(imgs[i].convert("L").resize((side, side), Image.Resampling.LANCZOS), (x, yy + head))
            canvas.paste(imgs[j].convert("L").resize((side, side), Image.Resampling.LANCZOS), (x + side, yy + head))
        y += 2 * (side + head)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    print(f"\nwrote {out} ({out.stat().st_size / 1024:.0f} KB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="synthetic images in all (originals + planted copies)")
    ap.add_argument("--planted", type=int, default=5_000, help="synthetic planted near-copies")
    ap.add_argument("--side", type=int, default=64, help="synthetic image side (px)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=nd.DEFAULT_THRESHOLD)
    ap.add_argument("--btmd", help="measure on a real ImageFolder instead (e.g. ../shared/datasets/btmd/Training)")
    ap.add_argument("--sample", type=int, default=500, help="--btmd: images given planted edits")
    ap.add_argument("--grid", help="--btmd: write a PNG of pairs just inside / outside the default threshold")
    args = ap.parse_args()
    run_btmd(args) if args.btmd else run_synthetic(args)


if __name__ == "__main__":
    main()
