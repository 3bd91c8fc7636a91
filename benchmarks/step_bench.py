"""Shared pieces of the step benchmarks: build one training step per variant, count its
FLOPs with ``torch.utils.flop_counter``, time it. Used by ``bench_steps.py`` (CPU, the
README table) and ``gpu_check.py`` (a lent GPU box: torch + timm only, no Ray)."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from msmae.engine import MaskRatios, draw_masks, finetune_step, predict_probs, pretrain_step  # noqa: E402
from msmae.models import build_classifier, build_pretrain_model, get_preset  # noqa: E402

# (phase, variant) -> what the step does. Ratios are the paper's defaults.
VARIANTS = {
    ("finetune", "all tokens"): "ViT on all L tokens (plain fine-tuning)",
    ("finetune", "SAM 25%"): "encoder on the 25 % kept tokens (m 0.45, t 0.30)",
    ("pretrain", "MAE"): "random 75 % masking, decoder on all L tokens",
    ("pretrain", "MSMAE"): "SAM m 0.45 / t 0.30: encoder on 25 %, decoder on kept + masked",
    ("eval", "all tokens"): "inference forward on the whole image",
}


@dataclass
class StepResult:
    preset: str
    phase: str
    variant: str
    batch: int
    flops: float  # per step (forward + backward for training steps)
    seconds: float  # median per step

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def tflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e12


def make_step(
    preset: str, phase: str, variant: str, batch: int, device: torch.device, amp: bool, compile_model: bool = False
) -> Callable[[], None]:
    """A closure running one step of the variant on random data (fixed per closure).

    ``compile_model`` wraps the model in ``torch.compile`` (fine-tuning and eval only).
    """
    spec = get_preset(preset)
    num_classes = 4
    images = torch.randn(batch, 3, spec.img_size, spec.img_size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    weights = torch.rand(batch, spec.num_patches, device=device)
    ratios = MaskRatios()
    if phase == "pretrain":
        model = build_pretrain_model(spec, num_classes).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
        masking_phase = "random" if variant == "MAE" else "sam"

        def step() -> None:
            split = draw_masks(masking_phase, ratios, batch, spec.num_patches, weights, generator, device)
            pretrain_step(model, optimizer, images, labels, split, amp=amp)

        return step
    model = build_classifier(spec, num_classes).to(device)
    if compile_model:
        model = torch.compile(model)
    if phase == "eval":
        return lambda: predict_probs(model, images, amp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        kept = None
        if variant.startswith("SAM"):
            kept = draw_masks("sam", ratios, batch, spec.num_patches, weights, generator, device).kept
        finetune_step(model, optimizer, images, labels, kept, amp=amp)

    return step


def count_flops(step: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per step after ``warmup`` untimed steps."""
    return time_interleaved([step], device, warmup, repeats)[0]


def time_interleaved(steps: list[Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median seconds per step of several steps timed in turns (A, B, A, B, ...), so that
    drift in the machine's speed (other processes, clock changes) hits all of them alike."""
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for i, step in enumerate(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run_pair(
    preset: str, phase: str, variants: tuple[str, str], batch: int, device: torch.device, amp: bool, warmup: int, repeats: int
) -> list[StepResult]:
    """Two variants of the same phase, FLOPs counted and times measured in turns."""
    steps = [make_step(preset, phase, v, batch, device, amp) for v in variants]
    flops = [count_flops(step) for step in steps]
    seconds = time_interleaved(steps, device, warmup, repeats)
    return [StepResult(preset, phase, v, batch, f, t) for v, f, t in zip(variants, flops, seconds)]


def run_variant(
    preset: str, phase: str, variant: str, batch: int, device: torch.device, amp: bool, warmup: int, repeats: int,
    compile_model: bool = False,
) -> StepResult:
    if compile_model:  # FLOPs of the eager step: the flop counter does not see inside compiled graphs
        flops = count_flops(make_step(preset, phase, variant, batch, device, amp))
        step = make_step(preset, phase, variant, batch, device, amp, compile_model=True)
    else:
        step = make_step(preset, phase, variant, batch, device, amp)
        flops = count_flops(step)
    seconds = time_step(step, device, warmup, repeats)
    label = f"{variant} (compiled)" if compile_model else variant
    return StepResult(preset, phase, label, batch, flops, seconds)
