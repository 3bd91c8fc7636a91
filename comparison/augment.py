"""Training augmentation done batched on the device, for data that already lives there.

The Ray pipeline decodes and crops on CPU workers. A single GPU holding a whole small
dataset as one uint8 tensor needs none of that: RandomResizedCrop + horizontal flip is an
affine resampling, so a batch of crops is one ``affine_grid`` + ``grid_sample``. The
batches carry exactly what ``msmae.train_one_epoch`` reads — image, label, index,
crop_box (x0, y0, x1, y1 in the source image's normalised coordinates) and flipped — so
the attention table moves each map with its image as it does in the pipeline.

Crops follow torchvision's ``RandomResizedCrop.get_params`` (area fraction and aspect
ratio drawn in the *source's* pixel proportions, 10 attempts, centre-crop fallback),
without its rounding to whole pixels; nothing here reads a value back to the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
ATTEMPTS = 10


def sample_crop_boxes(
    aspect: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = ATTEMPTS,
) -> torch.Tensor:
    """RandomResizedCrop boxes ``[B, 4]`` (x0, y0, x1, y1 in [0, 1]) for sources of ``aspect`` = W / H.

    In normalised coordinates a crop of area fraction s and pixel aspect r (w / h) of a
    W × H source has width sqrt(s·r/a) and height sqrt(s·a/r), a = W / H.
    """
    aspect = aspect.float()
    batch, device = aspect.shape[0], aspect.device
    s = scale[0] + (scale[1] - scale[0]) * torch.rand(batch, attempts, generator=generator, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(batch, attempts, generator=generator, device=device))
    a = aspect[:, None]
    w, h = torch.sqrt(s * r / a), torch.sqrt(s * a / r)
    valid = (w <= 1) & (h <= 1)
    first = valid.int().argmax(dim=1, keepdim=True)  # the first valid attempt (0 if none)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # torchvision's fallback: the whole image, cut to the nearest allowed ratio, centred.
    fw = torch.where(aspect > ratio[1], ratio[1] / aspect, torch.ones_like(aspect))
    fh = torch.where(aspect < ratio[0], aspect / ratio[0], torch.ones_like(aspect))
    found = valid.any(dim=1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(batch, 2, generator=generator, device=device)
    x0 = torch.where(found, u[:, 0] * (1 - w), (1 - w) / 2)
    y0 = torch.where(found, u[:, 1] * (1 - h), (1 - h) / 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def sample_flips(batch: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu", p: float = FLIP_P) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def resized_crop(
    images: torch.Tensor, boxes: torch.Tensor, flipped: torch.Tensor, size: int, mode: str = "bicubic"
) -> torch.Tensor:
    """Crop ``boxes`` out of ``images`` ``[B, C, H, W]``, resize to size×size, flip where asked.

    Returns float pixels on the input's scale (0–255 for uint8 input). Output pixel centres
    are spread evenly over the box (``align_corners=False``), so the whole-image box is
    exactly ``F.interpolate(images, size, mode=mode)``.
    """
    x0, y0, x1, y1 = boxes.float().unbind(dim=1)
    sign = 1.0 - 2.0 * flipped.float()  # a flip mirrors the output: negate the x scale
    # Output pixel centres in [-1, 1] (align_corners=False), mapped into the box. Built
    # elementwise rather than by affine_grid's matmul, so TF32 cannot blur the coordinates.
    centres = (2 * torch.arange(size, device=images.device, dtype=torch.float32) + 1) / size - 1  # [S]
    gx = ((x1 - x0) * sign)[:, None] * centres + (x0 + x1 - 1)[:, None]  # [B, S]
    gy = (y1 - y0)[:, None] * centres + (y0 + y1 - 1)[:, None]  # [B, S]
    grid = torch.stack([gx[:, None, :].expand(-1, size, -1), gy[:, :, None].expand(-1, -1, size)], dim=-1)  # [B, S, S, 2]
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp_(0, 255) if images.dtype == torch.uint8 else out


_STATS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """0–255 pixels (any dtype) → float, ImageNet mean / std, as the pipeline's streams emit."""
    if pixels.device not in _STATS:  # copied to the device once: a copy from host memory per batch would sync
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) * 255
        _STATS[pixels.device] = (mean.to(pixels.device), std.to(pixels.device))
    mean, std = _STATS[pixels.device]
    return (pixels.float() - mean) / std


def resize_whole(images: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 ``[N, 3, S, S]`` → uint8 ``[N, 3, size, size]`` (bicubic, antialiased), the eval transform."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    parts = []
    for start in range(0, images.shape[0], chunk):
        x = F.interpolate(images[start:start + chunk].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        parts.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(parts)


class TrainBatches:
    """Shuffled, augmented training batches drawn from uint8 images already on the device.

    ``index`` is the image's row in ``images`` — the training split's dataset index, which
    keys the attention table. Each pass (``iter``) draws a fresh permutation and fresh crops
    from ``generator``; the last partial batch is dropped, as in the pipeline.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        aspect: torch.Tensor,
        size: int,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        if len(images) < batch_size:
            raise ValueError(f"the training split has {len(images)} images, fewer than one batch of {batch_size}")
        self.images, self.labels, self.aspect = images, labels.to(images.device), aspect.to(images.device)
        self.size, self.batch_size, self.generator = size, batch_size, generator

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        device = self.images.device
        order = torch.randperm(len(self.images), generator=self.generator, device=device)
        for step in range(len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            boxes = sample_crop_boxes(self.aspect[index], self.generator)
            flipped = sample_flips(len(index), self.generator, device)
            pixels = resized_crop(self.images[index], boxes, flipped, self.size)
            yield {"image": normalise(pixels), "label": self.labels[index], "index": index, "crop_box": boxes, "flipped": flipped}


def eval_batches(images: torch.Tensor, second: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(normalised images, second)`` batches in order: second is the labels or the indices."""
    for start in range(0, len(images), batch_size):
        yield normalise(images[start:start + batch_size]), second[start:start + batch_size]
