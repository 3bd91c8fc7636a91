"""Do the maps find the lesion? Scores of attention maps against expert lesion masks.

SAM rests on one premise: the supervised head's map localises the lesion, so hiding the
high-weight patches makes the encoder reconstruct lesion tissue. ``msmae.map_quality``
can only say "tissue vs black background"; with a lesion mask per image (HAM10000 ships
one) the premise can be measured directly.

A patch is a *lesion patch* when at least half of its pixels are lesion
(``LESION_LEVEL``), on the same row-major patch grid as the maps. Per image, then
averaged over the images that have both lesion and non-lesion patches:

- ``lesion_mass``: share of the map's total weight on lesion patches;
- ``lesion_share``: share of patches that are lesion (what a uniform map scores);
- ``lesion_lift``: mean mass / mean share (1: no preference; above 1: the map favours the lesion);
- ``pointing``: the top-weighted patch lies in the lesion (pointing game; a tie at the top
  counts the lesion share of the tied patches, so a flat map scores its chance level);
- ``auroc``: probability that a random lesion patch outweighs a random non-lesion patch
  (ties count one half; 0.5: no preference);
- ``seen_lesion_share`` / ``masked_lesion_share`` (``masking_lesion_shares``): lesion share
  of the visible and of the masked patches of a SAM draw from the maps — what the encoder
  actually saw and what it had to reconstruct.

Images whose mask has no lesion patch, or only lesion patches, say nothing about
localisation and are counted (``images_skipped``), not scored. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LESION_LEVEL = 0.5  # a patch is lesion when at least this share of its pixels is


@dataclass(frozen=True)
class LesionScores:
    lesion_mass: float
    lesion_share: float
    lesion_lift: float
    pointing: float
    auroc: float
    images: int  # images scored
    images_skipped: int  # images with no lesion patch, or with lesion patches only

    def metrics(self, prefix: str = "lesion_") -> dict[str, float]:
        """Flat floats for MLflow and the epoch line: ``lesion_mass``, ``lesion_lift``, ``lesion_pointing``, ..."""
        out = {}
        for key, value in self.__dict__.items():
            name = key if key.startswith("lesion_") else f"lesion_{key}"
            out[prefix + name.removeprefix("lesion_")] = float(value)
        return out


def lesion_patches(masks: torch.Tensor, patch_size: int, level: float = LESION_LEVEL) -> torch.Tensor:
    """``[B, L]`` bool: patches whose share of lesion pixels is at least ``level`` (row-major, as the maps).

    ``masks`` are ``[B, H, W]`` or ``[B, 1, H, W]``, lesion where non-zero (bool, 0/1 or 0/255),
    at the model's input size (the image's geometry applied to them)."""
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be [B, H, W] or [B, 1, H, W], got {tuple(masks.shape)}")
    if masks.shape[-1] % patch_size or masks.shape[-2] % patch_size:
        raise ValueError(f"mask size {tuple(masks.shape[-2:])} is not a multiple of the patch size {patch_size}")
    share = F.avg_pool2d((masks != 0).float(), patch_size)  # [B, 1, gh, gw]
    return share.flatten(1) >= level


def _probabilities(maps: torch.Tensor) -> torch.Tensor:
    """Each map as a distribution over its patches (negative weights clipped; an all-zero map is uniform)."""
    weights = maps.double().clamp_min(0)
    total = weights.sum(dim=1, keepdim=True)
    weights = torch.where(total > 0, weights, torch.ones_like(weights))
    return weights / weights.sum(dim=1, keepdim=True)


def patch_auroc(maps: torch.Tensor, lesion: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """``[N]`` AUROC of patch weight against lesion membership, per image (Mann-Whitney, ties one half).

    NaN for an image with no lesion or no non-lesion patch."""
    out = []
    for start in range(0, len(maps), chunk):
        w, y = maps[start:start + chunk].double(), lesion[start:start + chunk].bool()
        diff = w[:, :, None] - w[:, None, :]  # [n, L, L]: weight of patch i minus patch j
        pair = (y[:, :, None] & ~y[:, None, :]).double()  # i lesion, j not
        wins = ((diff > 0).double() + 0.5 * (diff == 0).double()) * pair
        pairs = pair.sum(dim=(1, 2))
        out.append(torch.where(pairs > 0, wins.sum(dim=(1, 2)) / pairs.clamp_min(1), torch.full_like(pairs, float("nan"))))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def lesion_scores(maps: torch.Tensor, lesion: torch.Tensor) -> LesionScores:
    """Score maps ``[N, L]`` (non-negative weights) against lesion patches ``[N, L]`` (bool)."""
    if maps.shape != lesion.shape or maps.ndim != 2:
        raise ValueError(f"maps and lesion must both be [N, L], got {tuple(maps.shape)} and {tuple(lesion.shape)}")
    lesion = lesion.to(maps.device, torch.bool)
    informative = lesion.any(dim=1) & ~lesion.all(dim=1)
    skipped = int((~informative).sum())
    maps, lesion = maps[informative], lesion[informative]
    if not len(maps):
        nan = float("nan")
        return LesionScores(nan, nan, nan, nan, nan, 0, skipped)
    p = _probabilities(maps)
    mass = (p * lesion).sum(dim=1)
    share = lesion.double().mean(dim=1)
    top = p >= p.amax(dim=1, keepdim=True) * (1 - 1e-9)  # the top patch, or the patches tied at the top
    pointing = (top & lesion).sum(dim=1).double() / top.sum(dim=1).double()
    mean_mass, mean_share = float(mass.mean()), float(share.mean())
    return LesionScores(
        lesion_mass=mean_mass,
        lesion_share=mean_share,
        lesion_lift=mean_mass / mean_share,
        pointing=float(pointing.mean()),
        auroc=float(patch_auroc(p, lesion).mean()),
        images=len(maps),
        images_skipped=skipped,
    )


def masking_lesion_shares(kept: torch.Tensor, masked: torch.Tensor, lesion: torch.Tensor) -> dict[str, float]:
    """Lesion share of the visible (``kept`` ``[N, k]``) and the masked (``masked`` ``[N, m]``) patches.

    Compare with ``lesion_share``: the paper's rule should show the encoder less lesion than
    a uniform draw does, and make it reconstruct more."""
    lesion = lesion.to(kept.device, torch.float64)
    return {
        "lesion_seen_share": float(lesion.gather(1, kept.long()).mean()),
        "lesion_masked_share": float(lesion.gather(1, masked.long()).mean()),
    }
