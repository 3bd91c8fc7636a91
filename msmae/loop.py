"""One training epoch of either stage, for any loop: a Ray Train worker or a single-GPU script.

The epoch is where the method's pieces meet: the learning-rate schedule per step, the
masking phase (MAE-style random masking or SAM), the attention table's rows moved through
each image's crop and flip, and the stage's step function. Keeping it here, torch-only,
means the distributed pipeline and a plain script train exactly the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from msmae import defaults
from msmae.engine import MaskRatios, _unwrap, check_finite, draw_masks, finetune_step, pretrain_step
from msmae.losses import CLS_LOSSES, ClsLoss
from msmae.lesion_metrics import lesion_patches
from msmae.schedules import MaskingPhase, MaskingSchedule, cosine_lr, set_lr
from msmae.table import AttentionTable

Stage = Literal["pretrain", "finetune"]
# Which weights drive the SAM draw: the paper's supervised attention maps, the released
# code's uniform weights (its map refresh returns ones), or — fine-tuning only — no
# dropping at all (every token).
MaskingStrategy = Literal["attention", "uniform", "all"]
STRATEGIES: dict[Stage, tuple[MaskingStrategy, ...]] = {"pretrain": ("attention", "uniform"), "finetune": ("attention", "uniform", "all")}


@dataclass(frozen=True)
class EpochPlan:
    """How this epoch trains.

    ``phase`` "random": pre-training masks at random (MAE), fine-tuning sees all tokens.
    ``phase`` "sam": both drop patches by the (m, t) split, pre-training also reconstructs;
    ``strategy`` says which weights order the draw (see ``MaskingStrategy``): with
    "uniform" the split is random, with "all" fine-tuning never drops a token.
    ``align_maps=False`` uses each image's map as stored, ignoring the crop and flip — kept
    only to measure what aligning the maps is worth.
    """

    stage: Stage
    phase: MaskingPhase
    ratios: MaskRatios = MaskRatios()
    strategy: MaskingStrategy = "attention"
    align_maps: bool = True
    cls_weight: float = defaults.CLS_WEIGHT
    norm_pix_loss: bool = defaults.NORM_PIX_LOSS
    cls_loss: ClsLoss = "logits"  # pre-training's CLS term: on logits, or the released code's softmax first
    label_smoothing: float = defaults.LABEL_SMOOTHING
    grad_clip: float | None = None
    # per-class cross-entropy weights [C] (msmae.balanced_class_weights) for imbalanced data; None: unweighted
    class_weights: torch.Tensor | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES[self.stage]:
            raise ValueError(f"{self.stage} masking strategy {self.strategy!r}: choose one of {STRATEGIES[self.stage]}")
        if self.cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss {self.cls_loss!r}: choose one of {CLS_LOSSES}")

    @property
    def uses_maps(self) -> bool:
        """Does this plan read the attention table (so the maps must be refreshed)?"""
        return self.strategy == "attention"


@dataclass
class EpochTotals:
    """Loss sums kept on the device during the epoch; read back once, at the end."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: int = 0
    data_wait_seconds: float = 0.0  # host time spent waiting for the next batch (the input pipeline's share)
    # lesion shares of what the encoder saw / had to reconstruct, summed over the images that have a lesion
    # mask (batches of a dataset ingested with masks): sums and image count stay on the device
    lesion_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    lesion_images: torch.Tensor | float = 0.0

    def add(self, losses: Mapping[str, torch.Tensor], n: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * n
        self.seen += n

    def add_lesion(self, shares: Mapping[str, torch.Tensor], images: torch.Tensor) -> None:
        """Per-image lesion shares ``[B]`` of this batch, counted only where ``images`` (bool ``[B]``) has a mask."""
        for name, value in shares.items():
            self.lesion_sums[name] = self.lesion_sums.get(name, 0.0) + (value * images).sum()
        self.lesion_images = self.lesion_images + images.sum()

    def means(self) -> dict[str, float]:
        """Per-image means as floats (one host sync); raises on a non-finite loss."""
        out = {name: check_finite(float(total) / max(self.seen, 1), f"train {name}") for name, total in self.sums.items()}
        masked_images = float(self.lesion_images)
        if masked_images:
            out.update({name: float(total) / masked_images for name, total in self.lesion_sums.items()})
        return out


def batch_weights(table: AttentionTable | None, batch: Mapping[str, torch.Tensor], plan: EpochPlan, num_patches: int) -> torch.Tensor:
    """The batch's draw weights ``[B, L]`` on the images' device: its maps, moved with the
    augmentation (or as stored), or all ones for the uniform strategy."""
    if plan.strategy == "uniform":
        return torch.ones(len(batch["image"]), num_patches, device=batch["image"].device)
    if plan.align_maps:
        return table.batch_weights(batch["index"], batch["crop_box"], batch["flipped"], device=batch["image"].device)
    return table.rows(batch["index"], device=batch["image"].device)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    plan: EpochPlan,
    table: AttentionTable | None,
    lr_at: Callable[[float], float],
    epoch: int,
    steps_per_epoch: int,
    generator: torch.Generator | None = None,
) -> EpochTotals:
    """Train over ``batches`` (dicts with image, label, index, crop_box, flipped on the device).

    ``lr_at`` maps a fractional epoch to the learning rate (set every step, as MAE does).
    ``table`` is needed in the "sam" phase of the attention strategy only. Nothing here
    reads a value back to the host.
    """
    drops_tokens = plan.phase == "sam" and plan.strategy != "all"
    if drops_tokens and plan.uses_maps and table is None:
        raise ValueError("the SAM phase needs an attention table")
    num_patches = _unwrap(model).preset.num_patches
    class_weights = plan.class_weights
    if class_weights is not None:  # moved to the model's device once per epoch, not once per step
        class_weights = class_weights.to(next(model.parameters()).device)
    totals = EpochTotals()
    for step, batch in enumerate(_timed(batches, totals)):
        set_lr(optimizer, lr_at(epoch + step / steps_per_epoch))
        images, labels = batch["image"], batch["label"]
        weights = batch_weights(table, batch, plan, num_patches) if drops_tokens else None
        if plan.stage == "pretrain":
            split = draw_masks(plan.phase, plan.ratios, len(images), num_patches, weights, generator, images.device)
            kept = split.kept
            out = pretrain_step(model, optimizer, images, labels, split, plan.cls_weight, plan.norm_pix_loss, grad_clip=plan.grad_clip,
                                class_weights=class_weights, cls_loss=plan.cls_loss)
            losses = {"loss": out.loss, "loss_recon": out.reconstruction, "loss_cls": out.classification}
        else:
            kept = None
            if drops_tokens:
                kept = draw_masks("sam", plan.ratios, len(images), num_patches, weights, generator, images.device).kept
            losses = {"loss": finetune_step(model, optimizer, images, labels, kept, plan.label_smoothing, grad_clip=plan.grad_clip,
                                            class_weights=class_weights)}
        totals.add({**losses, **seen_by_encoder(kept, weights, num_patches)}, len(images))
        if "mask" in batch:  # lesion masks, moved with the augmentation like the image
            masked = split.masked if plan.stage == "pretrain" else None
            totals.add_lesion(*lesion_seen(batch, kept, masked, _unwrap(model).preset.patch_size))
    return totals


def lesion_seen(batch: Mapping[str, torch.Tensor], kept: torch.Tensor | None, masked: torch.Tensor | None,
                patch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per image, the lesion share of the patches the encoder saw (all of them when ``kept`` is None) and,
    in pre-training, of those it had to reconstruct; with which images have a mask. SAM's premise is that
    its rule hides the lesion: ``lesion_seen_share`` below ``lesion_patch_share`` is the rule at work."""
    lesion = lesion_patches(batch["mask"], patch_size).float()  # [B, L] on the augmented image's grid
    shares = {"lesion_patch_share": lesion.mean(dim=1),
              "lesion_seen_share": lesion.mean(dim=1) if kept is None else lesion.gather(1, kept).mean(dim=1)}
    if masked is not None:
        shares["lesion_masked_share"] = lesion.gather(1, masked).mean(dim=1)
    return shares, batch["has_mask"].to(lesion.device, torch.float32)


def _timed(batches: Iterable[Mapping[str, torch.Tensor]], totals: EpochTotals) -> Iterator[Mapping[str, torch.Tensor]]:
    """The batches, with the time each ``next`` took (the step waiting for its batch) added to ``totals``."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)  # a batch is a mapping, never None
        totals.data_wait_seconds += time.perf_counter() - start
        if batch is None:
            return
        yield batch


def seen_by_encoder(kept: torch.Tensor | None, weights: torch.Tensor | None, num_patches: int) -> dict[str, torch.Tensor | float]:
    """What the encoder saw this step, for the epoch's record of the masking rule at work.

    ``tokens_seen``: patch tokens per image (all L, or the kept ones). ``seen_weight``: the
    mean draw weight of the kept patches over the mean weight of all patches — 1 for a
    uniform draw or all tokens, below 1 when the encoder sees the low-attention patches
    (the paper's rule).
    """
    if kept is None:
        return {"tokens_seen": float(num_patches), "seen_weight": 1.0}
    if weights is None:
        return {"tokens_seen": float(kept.shape[1]), "seen_weight": 1.0}
    seen = weights.gather(1, kept).mean(dim=1) / weights.mean(dim=1).clamp_min(1e-6)
    return {"tokens_seen": float(kept.shape[1]), "seen_weight": seen.mean().detach()}


@dataclass(frozen=True)
class StageSchedule:
    """A stage's learning rate per (fractional) epoch and when masking is random or SAM.

    ``masking=None``: the stage never uses attention maps (MAE pre-training, all-token
    fine-tuning, a supervised ViT from scratch) — phase "random" throughout, no refreshes.
    """

    epochs: int
    peak_lr: float
    min_lr: float
    warmup_epochs: float
    masking: MaskingSchedule | None = None

    def lr_at(self, fractional_epoch: float) -> float:
        return cosine_lr(fractional_epoch, self.peak_lr, self.min_lr, self.warmup_epochs, self.epochs)

    def phase(self, epoch: int) -> MaskingPhase:
        return "random" if self.masking is None else self.masking.phase(epoch)

    def refresh_due(self, epoch: int) -> bool:
        return self.masking is not None and self.masking.refresh_due(epoch)


@dataclass
class EpochOutcome:
    """What one epoch did: its phase, how many maps it refreshed first (0: none), its losses."""

    epoch: int
    phase: MaskingPhase
    maps_refreshed: int
    totals: EpochTotals
    train_seconds: float

    @property
    def data_wait_fraction(self) -> float:
        """Share of the epoch's training time spent waiting for batches (0: the input pipeline keeps up)."""
        return self.totals.data_wait_seconds / max(self.train_seconds, 1e-9)


@dataclass
class StageTrainer:
    """The epoch skeleton of a stage, shared by the Ray Train worker and the comparison runner.

    Each epoch: refresh the attention table when the schedule says so (``refresh`` is the
    caller's, since a distributed refresh all-gathers and a local one does not), pick the
    masking phase, train over ``batches`` with the per-step learning rate. Evaluation,
    checkpoints and logging stay with the caller, which owns the loop over epochs.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    plan: EpochPlan
    schedule: StageSchedule
    table: AttentionTable | None = None
    generator: torch.Generator | None = None

    def run_epoch(
        self,
        epoch: int,
        batches: Iterable[Mapping[str, torch.Tensor]],
        steps_per_epoch: int,
        refresh: Callable[[int], int] | None = None,
    ) -> EpochOutcome:
        refreshed = 0
        if self.plan.uses_maps and self.schedule.refresh_due(epoch):
            if refresh is None or self.table is None:
                raise ValueError(f"epoch {epoch} is due a map refresh: give the trainer a table and a refresh function")
            refreshed = refresh(epoch)
        phase = self.schedule.phase(epoch)
        start = time.perf_counter()
        totals = train_one_epoch(
            self.model, self.optimizer, batches, replace(self.plan, phase=phase), self.table,
            self.schedule.lr_at, epoch, steps_per_epoch, self.generator,
        )
        return EpochOutcome(epoch, phase, refreshed, totals, time.perf_counter() - start)
