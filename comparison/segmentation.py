"""Segmentation transfer in one process: which pre-trained encoder segments lesions best, at the same budget.

The encoder comparison of the issue (the paper's SETR experiment): an encoder pre-trained by
``comparison.runner`` (MSMAE with the attention rule, the uniform rule, MAE) or a random one,
plus a SETR-PUP head (``msmae.segmentation``), trained on a bundle's images and lesion masks
(``benchmarks/make_bundle.py --masks``) with BCE + Dice — the pipeline's ``msmae segment``
recipe, on data held on the device. Images and masks go through the same RandomResizedCrop +
flip (``comparison.augment.resized_crop``: bicubic for pixels, nearest for masks). Validation
Dice after every epoch chooses the state; test once; per-image Dice / IoU of val and test go into
the record so ``paired_mean_ci`` can pair two encoders image by image.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import msmae
from comparison.augment import normalise, resized_crop, sample_crop_boxes, sample_flips
from comparison.bundle import Bundle, decode_all
from comparison.augment import resize_whole
from msmae.segmentation import build_segmenter, dice_bce_loss, dice_iou, load_encoder_for_segmentation


@dataclass
class SegmentData:
    """A bundle with masks on the device: uint8 images at the bundle's side (train) or at img_size (val, test), bool masks alike."""

    train: torch.Tensor
    train_masks: torch.Tensor  # uint8 [N, 1, side, side] 0/1: cropped with the images
    train_aspect: torch.Tensor
    val: torch.Tensor
    val_masks: torch.Tensor  # bool [N, img, img]
    test: torch.Tensor
    test_masks: torch.Tensor


def segment_data(bundle: Bundle, img_size: int, device: torch.device | str) -> SegmentData:
    """The bundle's images with masks only (an image whose mask was quarantined has nothing to learn from)."""
    if bundle.mask is None:
        raise ValueError(f"bundle {bundle.name} has no lesion masks; rebuild it with make_bundle.py --masks")
    images = decode_all(bundle, device)
    out = {}
    for split in ("train", "val", "test"):
        rows = bundle.rows(split)
        rows = rows[bundle.has_mask[rows]]
        if not len(rows):
            raise ValueError(f"bundle {bundle.name}: no {split} image has a mask")
        masks = bundle.masks(rows).to(device)
        pixels = images[rows.to(device)]
        if split == "train":
            out.update(train=pixels, train_masks=masks[:, None].to(torch.uint8), train_aspect=bundle.aspect[rows].to(device))
        else:
            small = torch.nn.functional.interpolate(masks[:, None].float(), size=(img_size, img_size), mode="nearest-exact")[:, 0] > 0.5
            out.update({split: resize_whole(pixels, img_size), f"{split}_masks": small})
    return SegmentData(**out)


@dataclass(frozen=True)
class SegmentRecipe:
    epochs: int = 20
    batch_size: int = 64
    blr: float = 1e-3
    min_lr: float = 1e-6
    warmup: float = 2.0
    weight_decay: float = msmae.defaults.WEIGHT_DECAY
    dice_weight: float = 1.0
    threshold: float = 0.5
    eval_batch_size: int = 256


def _scores(model, images: torch.Tensor, masks: torch.Tensor, recipe: SegmentRecipe) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    dice, iou = [], []
    with torch.no_grad():
        for start in range(0, len(images), recipe.eval_batch_size):
            logits = model(normalise(images[start:start + recipe.eval_batch_size]))
            d, i = dice_iou(torch.sigmoid(logits[:, 0]) > recipe.threshold, masks[start:start + recipe.eval_batch_size])
            dice.append(d.cpu())
            iou.append(i.cpu())
    model.train()
    return torch.cat(dice).numpy(), torch.cat(iou).numpy()


def train_segmenter(
    encoder_state: dict | None, preset: msmae.ViTPreset, data: SegmentData, recipe: SegmentRecipe, seed: int, device: torch.device,
    progress=None,
) -> dict:
    """Train one segmenter (encoder from ``encoder_state``, a pre-training model's state dict, or random); the record."""
    from timm.optim import param_groups_weight_decay

    torch.manual_seed(seed)
    model = build_segmenter(preset)
    if encoder_state is not None:
        load_encoder_for_segmentation(model, encoder_state)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, recipe.weight_decay, model.encoder.no_weight_decay()),
                                  fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(seed * 1000 + 7)
    steps = len(data.train) // recipe.batch_size
    if steps < 1:
        raise ValueError(f"{len(data.train)} training images with masks, fewer than one batch of {recipe.batch_size}")
    base_lr = msmae.scaled_lr(recipe.blr, recipe.batch_size)
    best, curve, start = (-1.0, None, -1), [], time.perf_counter()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(data.train), generator=generator, device=device)
        total = 0.0
        for step in range(steps):
            index = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            boxes = sample_crop_boxes(data.train_aspect[index], generator)
            flipped = sample_flips(len(index), generator, device)
            images = normalise(resized_crop(data.train[index], boxes, flipped, preset.img_size))
            masks = resized_crop(data.train_masks[index], boxes, flipped, preset.img_size, mode="nearest") > 0.5
            msmae.set_lr(optimizer, msmae.cosine_lr(epoch + step / steps, base_lr, recipe.min_lr, recipe.warmup, recipe.epochs))
            loss = dice_bce_loss(model(images), masks, recipe.dice_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        val_dice, val_iou = _scores(model, data.val, data.val_masks, recipe)
        curve.append({"epoch": epoch, "train_loss": total / steps, "val_dice": float(val_dice.mean()), "val_iou": float(val_iou.mean())})
        if progress:
            progress(curve[-1])
        if curve[-1]["val_dice"] > best[0]:
            best = (curve[-1]["val_dice"], {k: v.detach().clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    val_dice, val_iou = _scores(model, data.val, data.val_masks, recipe)
    test_dice, test_iou = _scores(model, data.test, data.test_masks, recipe)
    return {"selected_epoch": best[2], "curve": curve, "seconds": time.perf_counter() - start,
            "val": {"dice": float(val_dice.mean()), "iou": float(val_iou.mean())},
            "test": {"dice": float(test_dice.mean()), "iou": float(test_iou.mean())},
            "per_image": {"val_dice": val_dice.tolist(), "val_iou": val_iou.tolist(), "test_dice": test_dice.tolist(), "test_iou": test_iou.tolist()},
            "model": model}


def paired_mean_ci(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired images (same images, same order) with a percentile bootstrap CI over images."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"paired scores need the same non-empty shape, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    tail = (1 - level) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mean_ci(values: np.ndarray, resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a percentile bootstrap CI (over images)."""
    return paired_mean_ci(np.asarray(values), np.zeros(len(values)), resamples, seed, level)
