"""GPU check for a lent accelerator box (torch + timm, no Ray, no MLflow); finishes in a few minutes.

    python3 benchmarks/gpu_check.py            # tests on CUDA, then the throughput table
    python3 benchmarks/gpu_check.py --skip-tests

1. Runs the method tests (tests/msmae) and the comparison harness's tests (tests/comparison)
   with MSMAE_TEST_DEVICE=cuda, each suite alone (--confcutdir: no Ray-side fixtures).
2. Prints images/s, achieved TFLOP/s and MFU for ViT-B/16 pre-training (MSMAE vs MAE) and
   fine-tuning (SAM 25 % vs all tokens) steps and the inference forward, bf16 autocast.
   FLOPs are counted by torch.utils.flop_counter (matmul/conv/SDPA, forward + backward);
   MFU = achieved / the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from step_bench import VARIANTS, run_variant

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def device_peak(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def run_tests() -> int:
    """Both suites, each alone; non-zero when either fails."""
    env = dict(os.environ, MSMAE_TEST_DEVICE="cuda", PYTHONPATH=str(ROOT))
    status = 0
    for suite in ("tests/msmae", "tests/comparison"):
        cmd = [sys.executable, "-m", "pytest", suite, "--confcutdir", suite, "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        print("$", " ".join(cmd), flush=True)
        status = subprocess.call(cmd, cwd=ROOT, env=env) or status
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd fine-tuning and eval steps")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    start = time.time()
    import timm

    name = torch.cuda.get_device_name()
    print(f"device {name}, torch {torch.__version__}, timm {timm.__version__}", flush=True)
    test_status = 0 if args.skip_tests else run_tests()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda")
    peak = device_peak(name)
    rows = []
    jobs = [(phase, variant, False) for phase, variant in VARIANTS]
    if args.compile:
        jobs += [(phase, variant, True) for phase, variant in VARIANTS if phase != "pretrain"]
    for phase, variant, compiled in jobs:
        batch = args.batch * 2 if phase == "eval" else args.batch
        result = run_variant(args.preset, phase, variant, batch, device, True, args.warmup, args.repeats, compiled)
        rows.append((result, VARIANTS[(phase, variant)]))
        print(f"  {phase} {result.variant}: {result.images_per_s:.0f} img/s", flush=True)
        torch.cuda.empty_cache()
    print()
    print(f"ViT preset {args.preset}, bf16 autocast, {name}; peak {peak or '?'} TFLOP/s dense bf16")
    print("| phase | variant | batch | ms/step | images/s | GFLOP/image | TFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r, _ in rows:
        mfu = f"{100 * r.tflops_per_s / peak:.1f} %" if peak else "n/a"
        print(
            f"| {r.phase} | {r.variant} | {r.batch} | {r.seconds * 1e3:.1f} | {r.images_per_s:.0f} "
            f"| {r.flops / r.batch / 1e9:.1f} | {r.tflops_per_s:.0f} | {mfu} |"
        )
    print(f"\nmax memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; wall {time.time() - start:.0f} s")
    sys.exit(test_status)


if __name__ == "__main__":
    main()
