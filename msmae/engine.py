"""One pre-training step, one fine-tuning step, one evaluation pass, one map refresh.

Loops live elsewhere (the Ray Train loop in ``pipelines/``, or a plain single-GPU script);
they call these functions with tensors already on the device. Steps return detached
tensors rather than Python floats so a GPU loop is not forced to synchronise every step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from msmae import defaults
from msmae.losses import ClsLoss, pretrain_loss
from msmae.map_sources import source_maps
from msmae.precision import autocast
from msmae.map_quality import foreground_patches
from msmae.masking import MaskSplit, random_masking, sam_masking
from msmae.metrics import ClassificationReport, classification_report
from msmae.models import MSMAEClassifier, MSMAEPretrainModel
from msmae.schedules import MaskingPhase


@dataclass(frozen=True)
class MaskRatios:
    """SAM ratios and the ratio of MAE-style random masking used before SAM starts."""

    mask: float = defaults.MASK_RATIO
    throw: float = defaults.THROW_RATIO
    random_mask: float = defaults.RANDOM_MASK_RATIO


def draw_masks(
    phase: MaskingPhase,
    ratios: MaskRatios,
    batch_size: int,
    num_patches: int,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskSplit:
    """The batch's kept / masked / thrown patches for the current masking phase.

    ``weights`` (``[B, L]``, already moved with the augmentation) are required in the
    ``sam`` phase and ignored in the ``random`` phase.
    """
    if phase == "random":
        return random_masking(batch_size, num_patches, ratios.random_mask, generator, device)
    if weights is None:
        raise ValueError("SAM masking needs attention weights for the batch")
    return sam_masking(weights, ratios.mask, ratios.throw, generator)


@dataclass
class PretrainStepOutput:
    loss: torch.Tensor
    reconstruction: torch.Tensor
    classification: torch.Tensor


def pretrain_step(
    model: MSMAEPretrainModel,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    split: MaskSplit,
    cls_weight: float = defaults.CLS_WEIGHT,
    norm_pix_loss: bool = defaults.NORM_PIX_LOSS,
    amp: bool = True,
    grad_clip: float | None = None,
    class_weights: torch.Tensor | None = None,
    cls_loss: ClsLoss = "logits",
) -> PretrainStepOutput:
    """Forward on the kept tokens, loss on the masked ones, one optimiser step."""
    model.train()
    with autocast(images.device, amp):
        pred, logits = model(images, split)
    patch_size = _unwrap(model).preset.patch_size
    loss, recon, cls = pretrain_loss(pred, logits, images, labels, split.masked, patch_size, cls_weight, norm_pix_loss, class_weights,
                                      cls_loss)
    _backward_step(loss, model, optimizer, grad_clip)
    return PretrainStepOutput(loss.detach(), recon.detach(), cls.detach())


def finetune_step(
    model: MSMAEClassifier,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    kept: torch.Tensor | None,
    label_smoothing: float = defaults.LABEL_SMOOTHING,
    amp: bool = True,
    grad_clip: float | None = None,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """A training step on the visible tokens only (``kept=None``: all tokens); returns the loss.
    ``class_weights`` (``[C]``) weight the cross-entropy by class (``msmae.balanced_class_weights``)."""
    model.train()
    with autocast(images.device, amp):
        logits = model(images, kept)
    loss = F.cross_entropy(logits.float(), labels, weight=class_weights, label_smoothing=label_smoothing)
    _backward_step(loss, model, optimizer, grad_clip)
    return loss.detach()


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or similar) wrapper."""
    return getattr(model, "module", model)


def _backward_step(
    loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None
) -> None:
    # No finiteness check here: reading the loss on the host would stall a GPU every step.
    # Loops check the returned (detached) losses when they read them anyway (see check_finite).
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def check_finite(value: float, what: str = "loss") -> float:
    """Raise a clear error for a NaN/inf loss a loop has read back (the steps never sync)."""
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(f"{what} is {value}; lower the learning rate or check the inputs")
    return value


@torch.no_grad()
def predict_probs(model: MSMAEClassifier, images: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """Class probabilities ``[B, C]`` from the whole image (all tokens), eval mode."""
    model.eval()
    with autocast(images.device, amp):
        logits = model(images)
    return logits.float().softmax(dim=-1)


@torch.no_grad()
def evaluate(
    model: MSMAEClassifier,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    amp: bool = True,
) -> tuple[ClassificationReport, torch.Tensor, torch.Tensor]:
    """Full-image evaluation over ``(images, labels)`` batches.

    Returns the report plus the gathered probabilities and labels (on CPU), which
    distributed callers all-gather before computing a global report.
    """
    all_probs, all_labels = [], []
    for images, labels in batches:
        all_probs.append(predict_probs(model, images, amp).cpu())
        all_labels.append(labels.cpu())
    if not all_probs:
        raise ValueError("evaluation got no batches: is the validation split empty?")
    probs, labels = torch.cat(all_probs), torch.cat(all_labels)
    return report_from_probs(probs, labels, num_classes), probs, labels


def report_from_probs(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassificationReport:
    """Metrics plus the cross-entropy of the predicted probabilities (the validation loss)."""
    loss = F.nll_loss(probs.clamp_min(1e-12).log(), labels.long()).item()
    return classification_report(probs, labels, num_classes, loss)


@dataclass
class RefreshedMaps:
    """Maps of un-augmented images with what the map-quality measure needs: which patches are tissue."""

    index: torch.Tensor  # [N] dataset indices
    maps: torch.Tensor  # [N, L] weights in [0, 1]
    foreground: torch.Tensor  # [N, L] bool (msmae.map_quality.foreground_patches)


@torch.no_grad()
def refresh_maps(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, ...]], amp: bool = True, source: str = "cls_attention",
) -> RefreshedMaps:
    """Maps for un-augmented ``(images, index)`` or ``(images, index, labels)`` batches, on CPU, with
    each patch's foreground flag.

    ``source`` is the map source (``msmae.map_sources.MAP_SOURCES``; the paper's is
    ``cls_attention``); labels, when the batches carry them, are the class that
    ``grad_attention`` and ``occlusion`` explain (else the predicted class).
    Any batch size works, a last partial batch included (reference-code defect 4).
    """
    patch_size = _unwrap(model).preset.patch_size
    indices, maps, foreground = [], [], []
    for batch in batches:
        images, index = batch[0], batch[1]
        labels = batch[2] if len(batch) > 2 else None
        with autocast(images.device, amp):
            maps.append(source_maps(model, images, source, labels).float().cpu())
        foreground.append(foreground_patches(images, patch_size).cpu())
        indices.append(index.cpu().long())
    if not maps:
        raise ValueError("no images to compute attention maps from")
    return RefreshedMaps(torch.cat(indices), torch.cat(maps), torch.cat(foreground))


def compute_attention_maps(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    amp: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps for un-augmented ``(images, index)`` batches: ``(index [N], maps [N, L])`` on CPU."""
    refreshed = refresh_maps(model, batches, amp)
    return refreshed.index, refreshed.maps
