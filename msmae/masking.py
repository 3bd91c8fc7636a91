"""Supervised attention-driven masking and throwing (SAM), and plain random masking.

One code path serves both: random masking is SAM with uniform weights and no throwing.
The draw is weighted sampling *without replacement* over the L patches, done as
Gumbel-top-k (sort ``log w + Gumbel noise``), which is exact, batched and free of the
failure modes of ``torch.multinomial`` on zero weights (reference-code defect 3).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from msmae import defaults

# Min-max normalisation gives every head one exact zero; log(0) would make a patch
# impossible to draw early, so every weight gets this floor before the draw.
WEIGHT_FLOOR = 1e-6

# Ratios come from YAML and from Optuna as floats: 0.29 * 100 = 28.999999999999996.
# Counting with a small tolerance makes ⌊L·m⌋ mean what the user wrote.
_COUNT_EPS = 1e-9


class MaskSplit(NamedTuple):
    """Patch indices per sample, each ``[B, n]`` (int64), disjoint, together all L patches.

    ``kept`` are the visible tokens the encoder sees, ``masked`` are hidden and
    reconstructed (scored by the loss), ``thrown`` are hidden and ignored everywhere.
    """

    kept: torch.Tensor
    masked: torch.Tensor
    thrown: torch.Tensor


def mask_counts(num_patches: int, mask_ratio: float, throw_ratio: float) -> tuple[int, int, int]:
    """Return ``(n_kept, n_masked, n_thrown)`` for L patches, validating the ratios.

    ⌊L·m⌋ masked, ⌊L·(m+t)⌋ − ⌊L·m⌋ thrown, the rest kept (49 of 196 at 0.45 / 0.30).
    """
    if not mask_ratio > 0:
        raise ValueError(f"mask_ratio={mask_ratio} must be > 0: at least one patch must be masked")
    if not throw_ratio >= 0:
        raise ValueError(f"throw_ratio={throw_ratio} must be >= 0")
    if num_patches < 2:
        raise ValueError(f"need at least 2 patches to mask (got L={num_patches})")
    n_masked = math.floor(num_patches * mask_ratio + _COUNT_EPS)
    n_hidden = math.floor(num_patches * (mask_ratio + throw_ratio) + _COUNT_EPS)
    n_kept = num_patches - n_hidden
    if n_masked < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} masks no patch of L={num_patches}; "
            f"use mask_ratio >= {1 / num_patches:.4f}"
        )
    if n_kept < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} + throw_ratio={throw_ratio} leaves {n_kept} of "
            f"L={num_patches} patches visible; at least one must remain (lower the ratios)"
        )
    return n_kept, n_masked, n_hidden - n_masked


def gumbel_order(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw an ordering of the L patches, ``[B, L]``, by weighted sampling without replacement.

    Sorting ``log w + G`` (G i.i.d. Gumbel) descending gives the same distribution over
    orderings as drawing patches one by one with probability ∝ w among those left.
    """
    noise_device = generator.device if generator is not None else weights.device
    uniform = torch.rand(weights.shape, generator=generator, device=noise_device, dtype=torch.float64)
    uniform = uniform.to(weights.device)
    # -log(-log U), with U kept away from 0 and 1 so the noise is finite.
    tiny = torch.finfo(torch.float64).tiny
    gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-16)))
    keys = torch.log(weights.double().clamp_min(0.0) + WEIGHT_FLOOR) + gumbel
    return torch.argsort(keys, dim=1, descending=True)


def sam_masking(
    weights: torch.Tensor,
    mask_ratio: float = defaults.MASK_RATIO,
    throw_ratio: float = defaults.THROW_RATIO,
    generator: torch.Generator | None = None,
) -> MaskSplit:
    """Split patches into masked / thrown / kept by supervised attention (SAM).

    ``weights`` is ``[B, L]``, one non-negative attention weight per patch (zeros allowed,
    NaN not). The first ⌊L·m⌋ patches of the weighted draw are masked, the next ones thrown,
    the last ones kept: high-attention patches tend to be hidden, low-attention tissue is
    what the encoder sees. Pass a ``torch.Generator`` for a reproducible draw.
    """
    if weights.ndim != 2:
        raise ValueError(f"weights must be [B, L], got shape {tuple(weights.shape)}")
    if weights.device.type == "cpu" and torch.isnan(weights).any():  # on a GPU this check would sync every step
        raise ValueError("weights contain NaN; attention maps must be finite")
    n_kept, n_masked, n_thrown = mask_counts(weights.shape[1], mask_ratio, throw_ratio)
    order = gumbel_order(weights, generator)  # [B, L], first drawn first
    masked, thrown, kept = order.split([n_masked, n_thrown, n_kept], dim=1)
    return MaskSplit(kept=kept, masked=masked, thrown=thrown)


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float = defaults.RANDOM_MASK_RATIO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskSplit:
    """MAE's random masking: a uniform draw, nothing thrown (used during the warm-up)."""
    uniform = torch.ones(batch_size, num_patches, device=device)
    return sam_masking(uniform, mask_ratio, 0.0, generator)
