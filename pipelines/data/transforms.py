"""Per-batch decode, crop and normalise for the Ray Data workers: numpy and PIL only, no torch.

Every process that runs or plans these maps (Ray Data's read/map task workers and the split
coordinators of each Train stage) imports this module. Importing torch, torchvision and timm
there cost ~7 s of CPU per process, a dozen processes per stage: on a small node that was most
of a stage's start-up. torchvision's ``resized_crop``/``resize``/``hflip`` on a PIL image are
PIL's own ``crop``/``resize``/``transpose``, so the pixels are unchanged (tests compare them
against torchvision); only RandomResizedCrop's box sampler is written out here, the same
algorithm drawing from numpy's generator.
"""

from __future__ import annotations

import io
import math
import secrets

import numpy as np
from PIL import Image

# timm's IMAGENET_DEFAULT_MEAN / IMAGENET_DEFAULT_STD (a test keeps them equal); importing timm
# for them would import torch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
INTERPOLATION = Image.Resampling.BICUBIC
# (x / 255 - mean) / std  ==  x * _SCALE + _SHIFT, done in two passes over the pixels
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD, dtype=np.float64))).astype(np.float32).reshape(3, 1, 1)
_SHIFT = (-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32).reshape(3, 1, 1)

Box = tuple[int, int, int, int]  # top, left, height, width in pixels (torchvision's order)


def decode(data: bytes) -> Image.Image:
    """Stored bytes → RGB PIL image (grayscale datasets are replicated to 3 channels)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def normalise(img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """PIL RGB → float32 [3, H, W], ImageNet mean/std; written into `out` when given."""
    chw = np.asarray(img).transpose(2, 0, 1)  # uint8 [3, H, W], a view
    out = np.multiply(chw, _SCALE, out=out, dtype=np.float32)
    out += _SHIFT
    return out


def resize_whole(img: Image.Image, size: int, resample: Image.Resampling = INTERPOLATION) -> Image.Image:
    """The whole image to size×size, bicubic: what evaluation and prediction see (a mask: nearest)."""
    return img.resize((size, size), resample)


def sample_crop(width: int, height: int, rng: np.random.Generator,
                scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO) -> Box:
    """RandomResizedCrop's box: up to 10 draws of area fraction and log-uniform aspect, else a
    centred crop of the closest allowed aspect (torchvision's ``get_params``, step for step)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def apply_crop(img: Image.Image, box: Box, flip: bool, size: int, resample: Image.Resampling = INTERPOLATION) -> Image.Image:
    """Crop (top, left, h, w), resize to size×size bicubic (a mask: nearest), then flip if asked."""
    top, left, h, w = box
    out = resize_whole(img.crop((left, top, left + w, top + h)), size, resample)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


# A lesion mask takes its image's crop box and flip, resampled nearest so it stays binary: one geometry.
MASK_INTERPOLATION = Image.Resampling.NEAREST


def decode_mask(data, size: tuple[int, int]) -> Image.Image | None:
    """Stored mask bytes (``pipelines.data.masks``: 1-bit PNG) -> an "L" image of 0 / 255; None for a row
    without a mask. ``size`` is its image's (width, height), which the mask must share."""
    if not isinstance(data, (bytes, bytearray)):
        return None
    with Image.open(io.BytesIO(data)) as img:
        mask = img.convert("L")
    if mask.size != size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]} px but its image {size[0]}x{size[1]}; re-run `msmae ingest --masks`")
    return mask


def _mask_columns(batch: dict[str, np.ndarray], n: int, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Empty ``mask`` uint8 [B, S, S] (1 = lesion) and ``has_mask`` bool [B] when the batch carries masks."""
    if "mask" not in batch:
        return None
    return np.zeros((n, size, size), dtype=np.uint8), np.zeros(n, dtype=bool)


def augment_batch(batch: dict[str, np.ndarray], size: int, seed: int, repeatable: bool, uint8: bool = False) -> dict[str, np.ndarray]:
    """Decode → RandomResizedCrop → flip → normalise, emitting each crop's box in [0, 1] source coordinates.

    ``uint8``: the cropped pixels as uint8 [B, 3, S, S], not normalised (a quarter of the bytes to
    move; the consumer normalises them, on its device: ``pipelines.data.streams.normalise_images``)."""
    n = len(batch["index"])
    images = np.empty((n, 3, size, size), dtype=np.uint8 if uint8 else np.float32)  # [B, 3, S, S]
    boxes = np.empty((n, 4), dtype=np.float32)  # [B, 4] x0, y0, x1, y1 in [0, 1]
    flipped = np.empty(n, dtype=bool)
    nonce = 0 if repeatable else secrets.randbits(63)
    mask_cols = _mask_columns(batch, n, size)
    for k in range(n):
        index = int(batch["index"][k])
        rng = np.random.default_rng([seed, index, nonce])
        img = decode(batch["image"][k])
        top, left, h, w = sample_crop(img.width, img.height, rng)
        flip = bool(rng.random() < FLIP_P)
        crop = apply_crop(img, (top, left, h, w), flip, size)
        if uint8:
            images[k] = np.asarray(crop).transpose(2, 0, 1)
        else:
            normalise(crop, out=images[k])
        boxes[k] = (left / img.width, top / img.height, (left + w) / img.width, (top + h) / img.height)
        flipped[k] = flip
        mask = decode_mask(batch["mask"][k], img.size) if mask_cols is not None else None
        if mask is not None:  # the image's own box and flip
            mask_cols[0][k] = np.asarray(apply_crop(mask, (top, left, h, w), flip, size, MASK_INTERPOLATION)) > 0
            mask_cols[1][k] = True
    out = {
        "image": images,
        "label": batch["label"].astype(np.int64),
        "index": batch["index"].astype(np.int64),
        "crop_box": boxes,
        "flipped": flipped,
    }
    if mask_cols is not None:
        out["mask"], out["has_mask"] = mask_cols
    return out


def permute_rows(table, seed: int | None):
    """A pyarrow table's rows in a random order (``seed`` None: fresh OS entropy on every call)."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    return table.take(order)


def resize_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Decode → whole image resized → normalise (evaluation and attention-map refresh)."""
    n = len(batch["index"])
    images = np.empty((n, 3, size, size), dtype=np.float32)  # [B, 3, S, S]
    mask_cols = _mask_columns(batch, n, size)
    for k in range(n):
        img = decode(batch["image"][k])
        normalise(resize_whole(img, size), out=images[k])
        mask = decode_mask(batch["mask"][k], img.size) if mask_cols is not None else None
        if mask is not None:
            mask_cols[0][k] = np.asarray(resize_whole(mask, size, MASK_INTERPOLATION)) > 0
            mask_cols[1][k] = True
    out = {"image": images, "label": batch["label"].astype(np.int64), "index": batch["index"].astype(np.int64)}
    if mask_cols is not None:
        out["mask"], out["has_mask"] = mask_cols
    return out


def normalise_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W], ImageNet mean/std: ``normalise`` over a batch, the same arithmetic."""
    out = np.multiply(pixels.transpose(0, 3, 1, 2), _SCALE, dtype=np.float32)
    out += _SHIFT
    return out
