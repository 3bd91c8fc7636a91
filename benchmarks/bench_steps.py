"""Training-step cost of MSMAE vs the same ViT without token dropping, one run, side by side.

    .venv/bin/python benchmarks/bench_steps.py                 # tiny and base on CPU
    .venv/bin/python benchmarks/bench_steps.py --presets tiny --repeats 5

Fine-tuning: SAM (encoder sees 25 % of tokens) vs all tokens — FLOPs (torch.utils.flop_counter,
forward + backward) and median wall time per step (forward, backward, AdamW).
Pre-training: MSMAE (SAM 0.45 / 0.30, decoder on kept + masked) vs MAE (random 75 %, decoder
on all tokens). Targets: fine-tune FLOPs ratio <= 0.27 (paper: 0.26), time ratio <= 0.40 on CPU.
"""

from __future__ import annotations

import argparse

import torch
from step_bench import StepResult, run_pair

PAIRS = [  # (phase, variant, baseline variant)
    ("finetune", "SAM 25%", "all tokens"),
    ("pretrain", "MSMAE", "MAE"),
]
DEFAULT_BATCH = {"tiny": 32, "small": 16, "base": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: per preset)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    rows: list[tuple[StepResult, StepResult]] = []
    for preset in args.presets:
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        for phase, variant, baseline in PAIRS:
            print(f"  {preset} {phase}: {variant} vs {baseline} (batch {batch}) ...", flush=True)
            ours, base = run_pair(preset, phase, (variant, baseline), batch, device, True, args.warmup, args.repeats)
            rows.append((ours, base))
    print()
    print("| preset | phase | variant vs baseline | batch | GFLOP/step | ms/step | FLOPs ratio | time ratio |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for ours, base in rows:
        print(
            f"| {ours.preset} | {ours.phase} | {ours.variant} vs {base.variant} | {ours.batch} "
            f"| {ours.flops / 1e9:.1f} vs {base.flops / 1e9:.1f} | {ours.seconds * 1e3:.0f} vs {base.seconds * 1e3:.0f} "
            f"| {ours.flops / base.flops:.3f} | {ours.seconds / base.seconds:.3f} |"
        )


if __name__ == "__main__":
    main()
