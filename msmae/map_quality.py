"""Do the attention maps point at tissue? A measure for every map refresh.

SAM's premise is that the supervised CLS head attends to the lesion, so its map hides
the lesion from the encoder. ViTs are known to park CLS attention on low-information
background tokens instead (the "registers" artifact), and on a brain MRI slice half the
patches are black background. This module measures where the map mass goes.

Foreground rule: a patch is foreground when the mean intensity of its pixels (image
un-normalised to [0, 1], averaged over channels) is above ``FOREGROUND_LEVEL`` = 0.1
(about 25 of 255). Scans (MRI, CT, X-ray) put the body on a near-black background, which
this separates; on images with no dark background (dermoscopy) every patch is foreground,
the share is 1 and the lift says nothing.

Reported per set of maps (means over images):
- ``foreground_mass``: share of each map's total weight on foreground patches;
- ``foreground_share``: share of patches that are foreground (what a uniform map would give);
- ``foreground_lift``: mass / share — above 1 the maps favour tissue, below 1 background;
- ``entropy``: each map's weight distribution's entropy / log L (1 = uniform, 0 = one patch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

FOREGROUND_LEVEL = 0.1


@dataclass(frozen=True)
class MapQuality:
    foreground_mass: float
    foreground_share: float
    foreground_lift: float
    entropy: float
    images: int

    def metrics(self, prefix: str = "map_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in self.__dict__.items() if k != "images"}


def foreground_patches(images: torch.Tensor, patch_size: int, level: float = FOREGROUND_LEVEL, normalised: bool = True) -> torch.Tensor:
    """``[B, L]`` bool: patches whose mean intensity is above ``level`` (row-major, as the maps).

    ``images`` are ``[B, C, H, W]``, ImageNet-normalised as the model sees them (or already in
    [0, 1] with ``normalised=False``).
    """
    pixels = images.float()
    if normalised:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=pixels.device).view(1, -1, 1, 1)
        pixels = pixels * std + mean
    intensity = F.avg_pool2d(pixels.clamp(0, 1).mean(dim=1, keepdim=True), patch_size)  # [B, 1, gh, gw]
    return intensity.flatten(1) > level


def map_quality(maps: torch.Tensor, foreground: torch.Tensor) -> MapQuality:
    """Where the mass of ``maps`` ``[N, L]`` (non-negative) goes, against ``foreground`` ``[N, L]``."""
    if maps.shape != foreground.shape or maps.ndim != 2:
        raise ValueError(f"maps and foreground must both be [N, L], got {tuple(maps.shape)} and {tuple(foreground.shape)}")
    if not len(maps):
        raise ValueError("no maps to measure")
    weights = maps.double().clamp_min(0)
    total = weights.sum(dim=1)
    # An all-zero map carries no preference: count it as uniform.
    weights = torch.where(total[:, None] > 0, weights, torch.ones_like(weights))
    p = weights / weights.sum(dim=1, keepdim=True)
    fg = foreground.to(p.device, torch.bool)
    mass = (p * fg).sum(dim=1)
    share = fg.double().mean(dim=1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=1) / math.log(maps.shape[1])
    mean_share = float(share.mean())
    mean_mass = float(mass.mean())
    return MapQuality(
        foreground_mass=mean_mass,
        foreground_share=mean_share,
        foreground_lift=mean_mass / mean_share if mean_share > 0 else float("nan"),
        entropy=float(entropy.mean()),
        images=len(maps),
    )
