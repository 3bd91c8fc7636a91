"""Move attention maps with the augmentation, so weight i belongs to patch i of the augmented image.

A map is computed on the whole, un-augmented image (resize only): weight i is the
attention on patch i, i.e. on that square of the image. Training images are a random
resized crop of the image, possibly flipped; the reference code indexes the map as if no
crop happened (defect 2). Here each patch of the augmented image gets the area-weighted
mean of the source patches it shows. Area weights separate into a row and a column
matrix, so a whole batch is two small batched matmuls: ``out = Wy · map · Wxᵀ``.
"""

from __future__ import annotations

import torch


def _overlap_weights(start: torch.Tensor, end: torch.Tensor, out_cells: int, src_cells: int) -> torch.Tensor:
    """``[B, out_cells, src_cells]``: the share of output cell j that lies in source cell c.

    Output cell j covers ``[start + (end-start)·j/n, start + (end-start)·(j+1)/n]`` of the
    source's normalised axis; source cell c covers ``[c/m, (c+1)/m]``.
    """
    steps = torch.arange(out_cells + 1, device=start.device, dtype=torch.float32) / out_cells
    edges = start[:, None] + (end - start)[:, None] * steps  # [B, n + 1]
    lo, hi = edges[:, :-1, None], edges[:, 1:, None]  # [B, n, 1]
    src = torch.arange(src_cells + 1, device=start.device, dtype=torch.float32) / src_cells
    src_lo, src_hi = src[:-1], src[1:]  # [m]
    overlap = (torch.minimum(hi, src_hi) - torch.maximum(lo, src_lo)).clamp_min(0)  # [B, n, m]
    return overlap / overlap.sum(-1, keepdim=True).clamp_min(1e-12)


def crop_flip_maps(
    maps: torch.Tensor,
    grid: tuple[int, int],
    crop_boxes: torch.Tensor,
    flipped: torch.Tensor,
    out_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Crop, resample and flip a batch of attention maps as their images were.

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
    boxes = crop_boxes.to(device=maps.device, dtype=torch.float32).clamp(0.0, 1.0)
    x0, y0, x1, y1 = boxes.unbind(dim=1)
    rows = _overlap_weights(y0, y1, oh, gh)  # [B, oh, gh]
    cols = _overlap_weights(x0, x1, ow, gw)  # [B, ow, gw]
    cols = torch.where(flipped.to(maps.device).view(batch, 1, 1), cols.flip(1), cols)
    grid_maps = maps.float().reshape(batch, gh, gw)
    out = rows @ grid_maps @ cols.transpose(1, 2)  # [B, oh, ow]
    return out.reshape(batch, oh * ow).to(maps.dtype)
