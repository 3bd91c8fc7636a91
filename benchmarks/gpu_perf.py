"""On a lent GPU box (torch + timm, no Ray, no MLflow): step MFU compiled vs not, and whether the data path keeps up.

    python3 benchmarks/gpu_perf.py                       # ViT-B/16 @ 224 on CUDA, the box's CPUs for the data path
    python3 benchmarks/gpu_perf.py --json $OUT/gpu_perf.json
    python3 benchmarks/gpu_perf.py --device cpu --preset tiny --img-size 32 --batch 4 --warmup 1 --steps 2 --images 64 \
        --data-workers 2 --compile-backend aot_eager                                            # CPU smoke run (~1 min)

1. Steps (bf16 autocast on CUDA, random data, FLOPs by torch.utils.flop_counter on the eager
   step, MFU = achieved / the device's dense bf16 peak): MSMAE pre-training (SAM, encoder on
   25 %), fine-tuning with SAM 25 % and with all tokens, eager and ``torch.compile``d — what
   ``scaling.torch_compile`` switches in the Ray worker.
2. The data path at ``--img-size`` with the box's CPUs: a torch DataLoader (one worker process
   per usable CPU) running the training stream's own per-batch function
   (``pipelines.data.transforms.augment_batch``: decode, RandomResizedCrop 0.2-1 bicubic, flip,
   normalise, crop box) over JPEGs synthesised from the bundled sample at ``--source-side`` px
   (BTMD's scans are 512 px; the sample's 96 px files would flatter the decode). Ray is not on
   the box, so this is the same work the Ray Data map tasks do, without Ray's own overhead.
3. The verdict: data images/s over each step's images/s (>= 1: the CPUs keep that step fed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from step_bench import count_flops, time_step  # noqa: E402

from msmae.engine import MaskRatios, draw_masks, pretrain_step  # noqa: E402
from msmae.models import build_pretrain_model, get_preset  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}  # dense, data sheets
SAMPLE = HERE.parent / "data" / "sample" / "btmd"


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pretrain_msmae_step(preset, batch: int, device: torch.device, amp: bool, backend: str | None):
    """One MSMAE pre-training step (SAM draw, encoder on the kept 25 %), compiled with ``backend`` unless None."""
    num_classes = 4
    model = build_pretrain_model(preset, num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    run = torch.compile(model, backend=backend, dynamic=None) if backend else model
    images = torch.randn(batch, 3, preset.img_size, preset.img_size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    weights = torch.rand(batch, preset.num_patches, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        split = draw_masks("sam", MaskRatios(), batch, preset.num_patches, weights, generator, device)
        pretrain_step(run, optimizer, images, labels, split, amp=amp)

    return step


def measure_steps(args, device: torch.device, amp: bool) -> list[dict]:
    preset = get_preset(args.preset, args.img_size)
    peak = next((p for k, p in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None) if device.type == "cuda" else None
    rows = []
    cases = [("pretrain", "MSMAE (SAM 25 %)"), ("finetune", "SAM 25%"), ("finetune", "all tokens")]
    for phase, variant in cases:
        flops = None
        for compiled in (False, True):
            backend = args.compile_backend if compiled else None
            if phase == "pretrain":
                step = pretrain_msmae_step(preset, args.batch, device, amp, backend)
            else:
                step = finetune_step_of(preset, variant, args.batch, device, amp, backend)
            if flops is None:
                flops = count_flops(step)  # the eager step: the counter does not see inside compiled graphs
            start = time.perf_counter()
            seconds = time_step(step, device, args.warmup, args.steps)
            wall = time.perf_counter() - start
            tflops = flops / seconds / 1e12
            rows.append({"phase": phase, "variant": variant, "compiled": compiled, "batch": args.batch, "ms_per_step": seconds * 1e3,
                         "images_per_s": args.batch / seconds, "gflop_per_image": flops / args.batch / 1e9, "tflops": tflops,
                         "mfu": tflops / peak if peak else None, "warmup_and_timing_s": wall})
            print(_step_line(rows[-1]), flush=True)
    return rows


def finetune_step_of(preset, variant: str, batch: int, device: torch.device, amp: bool, backend: str | None):
    """One fine-tuning step (SAM 25 % of the tokens, or all), as step_bench.make_step builds it, at any image size."""
    from msmae.engine import finetune_step
    from msmae.models import build_classifier

    model = build_classifier(preset, 4).to(device)
    run = torch.compile(model, backend=backend, dynamic=None) if backend else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    images = torch.randn(batch, 3, preset.img_size, preset.img_size, device=device)
    labels = torch.randint(0, 4, (batch,), device=device)
    weights = torch.rand(batch, preset.num_patches, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        kept = draw_masks("sam", MaskRatios(), batch, preset.num_patches, weights, generator, device).kept if variant.startswith("SAM") else None
        finetune_step(run, optimizer, images, labels, kept, amp=amp)

    return step


def _step_line(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
    return (f"| {r['phase']} | {r['variant']}{' (compiled)' if r['compiled'] else ''} | {r['batch']} | {r['ms_per_step']:.1f} "
            f"| {r['images_per_s']:.0f} | {r['gflop_per_image']:.1f} | {r['tflops']:.1f} | {mfu} |")


class JpegBatches(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches (lists of row positions), as bench_data.py's torch side."""

    def __init__(self, jpegs: list[bytes], size: int) -> None:
        self.images = np.array(jpegs, dtype=object)
        self.size = size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows: list[int]) -> dict[str, np.ndarray]:
        from pipelines.data.transforms import augment_batch

        batch = {"image": self.images[rows], "label": np.zeros(len(rows), dtype=np.int64), "index": np.asarray(rows, dtype=np.int64)}
        return augment_batch(batch, size=self.size, seed=0, repeatable=False)


def synthesise_jpegs(n: int, side: int) -> list[bytes]:
    """``n`` JPEGs: the sample's images resized to ``side`` px, flipped every other round, quality 90."""
    from PIL import Image

    sources = sorted(SAMPLE.rglob("*.jpg"))
    out = []
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as img:
            img = img.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
            if (i // len(sources)) % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            out.append(buf.getvalue())
    return out


def measure_data(args) -> dict:
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    workers = args.data_workers or usable_cpus()
    dataset = JpegBatches(synthesise_jpegs(args.images, args.source_side), args.img_size)
    sampler = BatchSampler(RandomSampler(range(len(dataset))), batch_size=args.batch, drop_last=False)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers, persistent_workers=True, prefetch_factor=4,
                        pin_memory=torch.cuda.is_available())
    rates = []
    for _ in range(args.data_epochs):
        start = time.perf_counter()
        n = sum(len(b["index"]) for b in loader)
        rates.append(n / (time.perf_counter() - start))
    steady = float(np.median(rates[1:])) if len(rates) > 1 else rates[0]
    result = {"workers": workers, "images": args.images, "source_side": args.source_side, "img_size": args.img_size,
              "epochs_images_per_s": rates, "images_per_s": steady}
    print(f"data path: {workers} DataLoader workers, {args.images} JPEGs of {args.source_side} px -> {args.img_size} px, "
          f"batch {args.batch}: epochs {', '.join(f'{r:.0f}' for r in rates)} img/s; steady {steady:.0f} img/s", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="base")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=4096, help="JPEGs in the data-path measurement")
    ap.add_argument("--source-side", type=int, default=512)
    ap.add_argument("--data-workers", type=int, default=None, help="default: every usable CPU")
    ap.add_argument("--data-epochs", type=int, default=3)
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled steps (aot_eager: a quick CPU check)")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-data", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, {usable_cpus()} usable CPUs, torch {torch.__version__}, preset {args.preset} @ {args.img_size} px", flush=True)
    result: dict = {"device": name, "cpus": usable_cpus(), "torch": torch.__version__, "preset": args.preset, "img_size": args.img_size}
    if not args.skip_data:  # first: the DataLoader forks before CUDA is initialised
        result["data"] = measure_data(args)
    if not args.skip_steps:
        print("| phase | variant | batch | ms/step | images/s | GFLOP/image | TFLOP/s | MFU |\n|---|---|---:|---:|---:|---:|---:|---:|", flush=True)
        result["steps"] = measure_steps(args, device, amp)
    if "data" in result and "steps" in result:
        print("\n| step | step images/s | data path images/s | data / step |\n|---|---:|---:|---:|")
        for r in result["steps"]:
            ratio = result["data"]["images_per_s"] / r["images_per_s"]
            r["data_over_step"] = ratio
            print(f"| {r['phase']} {r['variant']}{' (compiled)' if r['compiled'] else ''} | {r['images_per_s']:.0f} "
                  f"| {result['data']['images_per_s']:.0f} | {ratio:.2f}x{'' if ratio >= 1 else ' (data-bound)'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
