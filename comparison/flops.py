"""Training FLOPs per image of each kind of step, counted on the model itself.

Equal epochs are not equal compute: an MSMAE or MAE pre-training step encodes a quarter of
the tokens, an all-token fine-tuning step all of them. ``measure`` runs one real training
step (forward + backward) of each kind on a batch of two under
``torch.utils.flop_counter.FlopCounterMode`` and divides by the batch, so a run's FLOPs
are its curve's images times the FLOPs of the kind of step each epoch took
(``run_flops``); ``equal_flops_epochs`` turns that into the epochs a supervised ViT may
train at the masked methods' compute. Counted: matrix products, convolutions and
attention (what FlopCounterMode counts); element-wise work is left out, as is usual.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import msmae

BATCH = 2


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image: training steps by kind (forward + backward) and a forward pass on whole images."""

    pretrain_random: float
    pretrain_sam: float
    finetune_all: float
    finetune_sam: float
    cnn: float
    eval_vit: float
    eval_cnn: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _count(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / BATCH


def build_cnn(name: str, num_classes: int, preset: msmae.ViTPreset, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """A timm CNN from random weights behind the ViT classifier's call (see ``CNNClassifier``)."""
    return CNNClassifier(name, num_classes, preset, drop_path_rate)


class CNNClassifier(torch.nn.Module):
    """A timm CNN (e.g. ``resnet18``) that a ``msmae.StageTrainer`` can train like the ViT classifier.

    ``preset`` is the ViT's, kept only because the epoch loop reads ``preset.num_patches``
    for its record of tokens seen; a CNN never drops tokens, so ``kept`` must be None.
    """

    def __init__(self, name: str, num_classes: int, preset: msmae.ViTPreset, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, drop_path_rate=drop_path_rate)
        self.preset = preset

    def forward(self, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        if kept is not None:
            raise ValueError("a CNN sees the whole image: fine-tune it on all tokens (finetune='all')")
        return self.net(images)


def measure(preset: msmae.ViTPreset, num_classes: int, ratios: msmae.MaskRatios, cnn: str = "resnet18") -> StepFlops:
    """One training step of each kind on random images (CPU, fp32; nothing is kept)."""
    return _measure(preset, num_classes, ratios, cnn)


@lru_cache(maxsize=16)
def _measure(preset: msmae.ViTPreset, num_classes: int, ratios: msmae.MaskRatios, cnn: str) -> StepFlops:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, preset.img_size, preset.img_size, generator=gen)
    labels = torch.zeros(BATCH, dtype=torch.long)
    L = preset.num_patches
    pre = msmae.build_pretrain_model(preset, num_classes)
    clf = msmae.build_classifier(preset, num_classes, drop_path_rate=0.0)
    net = build_cnn(cnn, num_classes, preset)

    def pretrain(phase: str) -> float:
        split = msmae.draw_masks(phase, ratios, BATCH, L, torch.ones(BATCH, L), gen)

        def step() -> None:
            pred, logits = pre(images, split)
            loss = msmae.losses.pretrain_loss(pred, logits, images, labels, split.masked, preset.patch_size)
            loss[0].backward()
        return _count(step)

    def finetune(model: torch.nn.Module, kept: torch.Tensor | None) -> float:
        return _count(lambda: F.cross_entropy(model(images, kept) if kept is not None else model(images), labels).backward())

    def forward(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return _count(lambda: model(images))

    kept = msmae.draw_masks("sam", ratios, BATCH, L, torch.ones(BATCH, L), gen).kept
    return StepFlops(
        pretrain_random=pretrain("random"), pretrain_sam=pretrain("sam"), finetune_all=finetune(clf, None),
        finetune_sam=finetune(clf, kept), cnn=finetune(net, None), eval_vit=forward(clf), eval_cnn=forward(net),
    )


def step_kind(stage: str, phase: str, finetune_rule: str, arch: str) -> str:
    """Which ``StepFlops`` field an epoch of this stage and phase trained with."""
    if stage == "pretrain":
        return "pretrain_sam" if phase == "sam" else "pretrain_random"
    if arch != "vit":
        return "cnn"
    return "finetune_sam" if phase == "sam" and finetune_rule != "all" else "finetune_all"


def run_flops(pretrain_curve: list[dict], finetune_curve: list[dict], finetune_rule: str, arch: str, flops: StepFlops,
              counts: dict[str, int], maps_refreshed: int = 0) -> dict[str, float]:
    """A run's FLOPs from its curves: ``train`` (training steps), ``eval`` (validation passes and
    the test pass), ``maps`` (attention-map refreshes, one forward pass per refreshed image)."""
    per = flops.as_dict()
    train = sum(row["images"] * per[step_kind(row["stage"], row["phase"], finetune_rule, arch)]
                for row in [*pretrain_curve, *finetune_curve])
    forward = flops.eval_cnn if arch != "vit" else flops.eval_vit
    evaluated = len(finetune_curve) * counts["val"] + counts["test"]
    evaluated += sum(counts["val"] for row in pretrain_curve if "val_cls_balanced_accuracy" in row)
    return {"train": float(train), "eval": float(evaluated * forward), "maps": float(maps_refreshed * flops.eval_vit)}


def equal_flops_epochs(pretrain_epochs: int, sam_start: int, finetune_epochs: int, flops: StepFlops) -> tuple[int, float]:
    """All-token epochs whose training FLOPs equal MSMAE pre-training (random masking until
    ``sam_start``, then SAM) plus all-token fine-tuning: ``(epochs, exact ratio)``.

    The reference is ``msmae_ft_all`` as planned (a gated SAM start moves it a little); MAE's
    pre-training, random 75 % throughout, costs within a few per cent of it."""
    random_epochs = min(sam_start, pretrain_epochs)
    reference = (random_epochs * flops.pretrain_random + (pretrain_epochs - random_epochs) * flops.pretrain_sam
                 + finetune_epochs * flops.finetune_all)
    exact = reference / flops.finetune_all
    return max(1, math.floor(exact + 0.5)), exact
