"""The map-on-lesion metrics: a map on a known lesion scores full mass, high lift, a pointing hit
and AUROC 1; a map off it scores 0 and a miss; a flat map scores chance."""

from __future__ import annotations

import pytest
import torch

from msmae.lesion_metrics import lesion_patches, lesion_scores, masking_lesion_shares, patch_auroc
from msmae.masking import sam_masking


def _masks(batch: int = 3, size: int = 32) -> torch.Tensor:
    """0/255 masks with the lesion over the top-left quarter: 4 of the 16 patches of 8 px."""
    masks = torch.zeros(batch, size, size, dtype=torch.uint8)
    masks[:, : size // 2, : size // 2] = 255
    return masks


def test_lesion_patches_are_the_patches_at_least_half_lesion():
    masks = _masks()
    masks[:, 16:20, 0:8] = 255  # half of patch (2, 0) is lesion: counts; a quarter would not
    masks[:, 24:26, 8:16] = 255  # a quarter of patch (3, 1): does not count
    lesion = lesion_patches(masks, patch_size=8)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    expected[2, 0] = True
    assert lesion.shape == (3, 16) and torch.equal(lesion[0], expected.flatten())
    assert torch.equal(lesion_patches(masks[:, None] > 0, 8), lesion)  # [B, 1, H, W] bool gives the same


def test_a_map_on_the_lesion_scores_one_and_a_map_off_it_zero():
    lesion = lesion_patches(_masks(), patch_size=8)
    on = lesion_scores(lesion.float(), lesion)
    assert on.lesion_mass == pytest.approx(1.0)
    assert on.lesion_share == pytest.approx(4 / 16)
    assert on.lesion_lift == pytest.approx(4.0)
    assert on.pointing == pytest.approx(1.0)
    assert on.auroc == pytest.approx(1.0)
    assert (on.images, on.images_skipped) == (3, 0)

    off = lesion_scores((~lesion).float(), lesion)
    assert off.lesion_mass == pytest.approx(0.0)
    assert off.lesion_lift == pytest.approx(0.0)
    assert off.pointing == pytest.approx(0.0)
    assert off.auroc == pytest.approx(0.0)


def test_a_single_peak_points_and_a_flat_map_scores_chance():
    lesion = lesion_patches(_masks(), patch_size=8)
    peak = torch.zeros(3, 16)
    peak[:, 0] = 1.0  # the top-left patch: lesion
    peak[:, 15] = 0.5  # some weight off the lesion too
    scores = lesion_scores(peak, lesion)
    assert scores.pointing == pytest.approx(1.0)
    assert scores.lesion_mass == pytest.approx(1 / 1.5)

    flat = lesion_scores(torch.ones(3, 16), lesion)
    assert flat.lesion_lift == pytest.approx(1.0)
    assert flat.pointing == pytest.approx(4 / 16)  # a tie at the top: the tied patches' lesion share
    assert flat.auroc == pytest.approx(0.5)
    assert lesion_scores(torch.zeros(3, 16), lesion).lesion_lift == pytest.approx(1.0)  # no weight: uniform


def test_auroc_counts_ties_as_half_and_skips_images_without_both_kinds_of_patch():
    maps = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    lesion = torch.tensor([[True, False, True, False]])
    # pairs (lesion, other): (3,1) win, (3,2) win, (2,1) win, (2,2) tie -> 3.5 / 4
    assert patch_auroc(maps, lesion)[0].item() == pytest.approx(0.875)

    lesion = lesion_patches(_masks(), patch_size=8)
    lesion[1] = False  # an image without lesion patches
    lesion[2] = True  # an image that is lesion everywhere
    scores = lesion_scores(lesion.float(), lesion)
    assert (scores.images, scores.images_skipped) == (1, 2)
    assert scores.metrics()["lesion_images_skipped"] == 2.0 and scores.metrics()["lesion_pointing"] == 1.0
    empty = lesion_scores(torch.ones(1, 16), torch.zeros(1, 16, dtype=torch.bool))
    assert empty.images == 0 and empty.lesion_mass != empty.lesion_mass  # NaN, not a made-up score


def test_sam_by_a_map_on_the_lesion_hides_the_lesion_from_the_encoder(generator):
    lesion = lesion_patches(_masks(batch=64, size=64), patch_size=8)  # 16 of 64 patches
    split = sam_masking(lesion.float().to(generator.device), 0.25, 0.0, generator)  # 16 masked, 48 kept
    shares = masking_lesion_shares(split.kept, split.masked, lesion.to(generator.device))
    assert shares["lesion_masked_share"] > 0.99 and shares["lesion_seen_share"] < 0.01


def test_metrics_refuse_shapes_that_do_not_match():
    with pytest.raises(ValueError, match="must both be"):
        lesion_scores(torch.ones(2, 16), torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        lesion_patches(torch.ones(1, 30, 30), patch_size=8)
