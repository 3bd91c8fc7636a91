"""Move attention maps with the augmentation, so weight i belongs to patch i of the augmented image.

A map is computed on the whole, un-augmented image (resize only). Training images are a
random resized crop of that image, possibly flipped. The reference code indexes the map
as if no crop happened (defect 2). Here the map is treated as a small image covering the
source in normalised coordinates: each output patch takes the average of the bilinearly
upsampled map over the region of the source that the patch shows (``roi_align``), and
flipped samples are mirrored afterwards, exactly as the pixels were.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align

# Bilinear samples per output patch and axis: averages the upsampled map over the patch
# area rather than reading one point, so small crops do not alias.
_SAMPLES_PER_PATCH = 4


def crop_flip_maps(
    maps: torch.Tensor,
    grid: tuple[int, int],
    crop_boxes: torch.Tensor,
    flipped: torch.Tensor,
    out_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Crop, resample and flip a batch of attention maps like their images were.

    Args:
        maps: ``[B, L]`` weights of the whole image, row-major over ``grid`` (``L = gh*gw``).
        grid: ``(gh, gw)`` patch grid of ``maps``.
        crop_boxes: ``[B, 4]`` crops as ``(x0, y0, x1, y1)`` in the source image's
            normalised coordinates (x over width, y over height, in [0, 1]).
        flipped: ``[B]`` bool, a horizontal flip was applied after cropping.
        out_grid: patch grid of the augmented image; defaults to ``grid``.

    Returns:
        ``[B, L_out]`` weights for the patches of the augmented images.
    """
    gh, gw = grid
    oh, ow = out_grid or grid
    batch = maps.shape[0]
    if maps.shape != (batch, gh * gw):
        raise ValueError(f"maps must be [B, {gh * gw}] for grid {grid}, got {tuple(maps.shape)}")
    if crop_boxes.shape != (batch, 4) or flipped.shape != (batch,):
        raise ValueError(
            f"need crop_boxes [B, 4] and flipped [B] for B={batch}, "
            f"got {tuple(crop_boxes.shape)} and {tuple(flipped.shape)}"
        )
    images = maps.float().reshape(batch, 1, gh, gw)
    boxes = crop_boxes.to(device=maps.device, dtype=torch.float32)
    scale = torch.tensor([gw, gh, gw, gh], device=maps.device, dtype=torch.float32)
    batch_index = torch.arange(batch, device=maps.device, dtype=torch.float32)[:, None]
    rois = torch.cat([batch_index, boxes * scale], dim=1)  # [B, 5] in map-pixel units
    # aligned=True: pixel j covers [j, j+1), so a box (0, 0, gw, gh) reproduces the map.
    out = roi_align(images, rois, (oh, ow), spatial_scale=1.0, sampling_ratio=_SAMPLES_PER_PATCH, aligned=True)
    out = torch.where(flipped.to(maps.device).view(batch, 1, 1, 1), out.flip(-1), out)
    return out.reshape(batch, oh * ow).to(maps.dtype)
