"""MSMAE's training objective: reconstruction of masked patches + λ · CLS cross-entropy."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from msmae import defaults


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, L, p*p*3]``, patches row-major, pixels (p, p, channel) inside."""
    batch, channels, height, width = images.shape
    gh, gw = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, gh, patch_size, gw, patch_size)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(batch, gh * gw, patch_size**2 * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``patchify``: ``[B, L, p*p*3] -> [B, 3, H, W]``."""
    gh, gw = grid
    batch = patches.shape[0]
    x = patches.reshape(batch, gh, gw, patch_size, patch_size, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, -1, gh * patch_size, gw * patch_size)


def reconstruction_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    masked: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    ``pred`` is ``[B, n_masked, p*p*3]`` in the order of ``masked`` (``[B, n_masked]``);
    kept and thrown patches never enter the loss. With ``norm_pix_loss`` each target
    patch is standardised by its own mean and variance (MAE's option).
    """
    target = patchify(images, patch_size)  # [B, L, p*p*3]
    target = torch.gather(target, 1, masked.unsqueeze(-1).expand(-1, -1, target.shape[-1]))
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return F.mse_loss(pred.float(), target.float())


# How the CLS term reads the classifier's output: "logits" (cross-entropy on raw logits, ours) or
# "softmax_ce" (the released code's: softmax, then CrossEntropyLoss, which applies log-softmax again).
ClsLoss = Literal["logits", "softmax_ce"]
CLS_LOSSES: tuple[str, ...] = ("logits", "softmax_ce")


def cls_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, cls_loss: ClsLoss = "logits", class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The CLS term's cross-entropy, on logits or, as the released code, on softmax outputs.

    ``softmax_ce`` feeds probabilities in [0, 1] to a cross-entropy that treats them as
    logits: the loss can never fall below log(C) - (1 - 1/C)-ish and its gradient shrinks as
    the head grows confident (defect 1). Kept so ``msmae_released`` trains as the released code.
    """
    if cls_loss == "logits":
        return F.cross_entropy(logits.float(), labels, weight=class_weights)
    if cls_loss == "softmax_ce":
        return F.cross_entropy(logits.float().softmax(dim=-1), labels, weight=class_weights)
    raise ValueError(f"cls_loss {cls_loss!r}: choose one of {CLS_LOSSES}")


def pretrain_loss(
    pred: torch.Tensor,
    logits: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    masked: torch.Tensor,
    patch_size: int,
    cls_weight: float = defaults.CLS_WEIGHT,
    norm_pix_loss: bool = defaults.NORM_PIX_LOSS,
    class_weights: torch.Tensor | None = None,
    cls_loss: ClsLoss = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, reconstruction, classification)``; total = MSE + λ · CE.

    Cross-entropy takes raw logits by default: the reference code applied softmax first and
    so squashed the classifier's gradient (defect 1); ``cls_loss="softmax_ce"`` reproduces
    it. ``class_weights`` (``[C]``) weight each image's cross-entropy by its class
    (``balanced_class_weights``).
    """
    recon = reconstruction_loss(pred, images, masked, patch_size, norm_pix_loss)
    cls = cls_cross_entropy(logits, labels, cls_loss, class_weights)
    return recon + cls_weight * cls, recon, cls


def balanced_class_weights(counts: torch.Tensor | list[int]) -> torch.Tensor:
    """Per-class cross-entropy weights ``n / (C · n_c)`` for training-set class counts ``n_c``.

    On imbalanced data (HAM10000: 67 % one class) an unweighted loss lets a model sit at the
    majority class; these weights make every class count as much as the others in the loss,
    and are all 1 on a balanced set. A class with no training image gets weight 0 (there is
    nothing to weight), rather than an infinite one.
    """
    counts = torch.as_tensor(counts, dtype=torch.float32)
    if counts.ndim != 1 or not len(counts) or (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"class counts must be a non-empty list of non-negative numbers with a positive total, got {counts.tolist()}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights
