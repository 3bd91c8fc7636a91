"""Learning-rate and masking schedules, as pure functions of the (fractional) epoch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


def cosine_lr(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, total_epochs: float) -> float:
    """Linear warm-up to ``base_lr``, then half-cosine decay to ``min_lr`` (MAE's per-step schedule)."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scaled_lr(base_lr_per_256: float, global_batch: int) -> float:
    """The linear scaling rule the paper uses: lr = blr · batch / 256."""
    return base_lr_per_256 * global_batch / 256


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, honouring a group's ``lr_scale`` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


MaskingPhase = Literal["random", "sam"]


@dataclass(frozen=True)
class MaskingSchedule:
    """When masking is random vs supervised, and at which epochs attention maps are refreshed.

    Pre-training (paper): random until ``sam_start`` = W = 40, maps refreshed at W and every
    K = 40 epochs after. Fine-tuning: ``sam_start`` = 0, refresh at 0 and every 20.
    ``sam_stop`` (optional) ends the SAM phase early: from that epoch on the phase is
    "random" again — in fine-tuning, every token (dropped-token training, then all tokens).
    """

    sam_start: int
    refresh_every: int
    sam_stop: int | None = None

    def __post_init__(self) -> None:
        if self.sam_start < 0:
            raise ValueError(f"sam_start (warm-up epochs) must be >= 0, got {self.sam_start}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1 epoch, got {self.refresh_every}")
        if self.sam_stop is not None and self.sam_stop < self.sam_start:
            raise ValueError(f"sam_stop={self.sam_stop} is before sam_start={self.sam_start}")

    @classmethod
    def until_fraction(cls, sam_start: int, refresh_every: int, all_tokens_from: float | None, epochs: int) -> "MaskingSchedule":
        """A schedule whose SAM phase ends at ``all_tokens_from`` of ``epochs`` (None: it never ends)."""
        stop = None if all_tokens_from is None else max(sam_start, round(all_tokens_from * epochs))
        return cls(sam_start, refresh_every, stop)

    def phase(self, epoch: int) -> MaskingPhase:
        in_sam = epoch >= self.sam_start and (self.sam_stop is None or epoch < self.sam_stop)
        return "sam" if in_sam else "random"

    def refresh_due(self, epoch: int) -> bool:
        """Refresh the maps at the start of this epoch (from the model as it is then)?"""
        return self.phase(epoch) == "sam" and (epoch - self.sam_start) % self.refresh_every == 0

    def refresh_epochs(self, total_epochs: int) -> list[int]:
        return [e for e in range(total_epochs) if self.refresh_due(e)]
