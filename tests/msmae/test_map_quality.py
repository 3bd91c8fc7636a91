"""The map-quality measure: maps concentrated where we put them score as such."""

from __future__ import annotations

import pytest
import torch

from msmae.map_quality import foreground_patches, map_quality


def _scan(batch: int = 3, size: int = 32) -> torch.Tensor:
    """Black images with a bright square over the top-left quarter (the 'tissue'), in [0, 1]."""
    images = torch.zeros(batch, 3, size, size)
    images[:, :, : size // 2, : size // 2] = 0.8
    return images


def test_foreground_is_the_bright_region_of_the_scan():
    fg = foreground_patches(_scan(), patch_size=8, normalised=False)  # 4x4 grid, top-left 2x2 bright
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :2] = True
    assert fg.shape == (3, 16) and torch.equal(fg[0], expected.flatten())


def test_foreground_of_normalised_images_matches_the_raw_ones():
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    raw = _scan()
    normalised = (raw - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert torch.equal(foreground_patches(normalised, 8), foreground_patches(raw, 8, normalised=False))


def test_a_map_on_the_tissue_scores_full_mass_and_a_map_on_the_background_none():
    fg = foreground_patches(_scan(), patch_size=8, normalised=False)
    on_tissue = fg.float()  # all weight on the 4 foreground patches
    quality = map_quality(on_tissue, fg)
    assert quality.foreground_mass == pytest.approx(1.0)
    assert quality.foreground_share == pytest.approx(4 / 16)
    assert quality.foreground_lift == pytest.approx(4.0)
    assert quality.entropy == pytest.approx(torch.log(torch.tensor(4.0)).item() / torch.log(torch.tensor(16.0)).item())
    on_background = map_quality((~fg).float(), fg)
    assert on_background.foreground_mass == pytest.approx(0.0) and on_background.foreground_lift == pytest.approx(0.0)


def test_a_uniform_map_has_lift_one_and_full_entropy():
    fg = foreground_patches(_scan(), patch_size=8, normalised=False)
    quality = map_quality(torch.ones(3, 16), fg)
    assert quality.foreground_lift == pytest.approx(1.0) and quality.entropy == pytest.approx(1.0)
    assert map_quality(torch.zeros(3, 16), fg).foreground_lift == pytest.approx(1.0)  # all-zero maps count as uniform
    assert set(quality.metrics()) == {"map_foreground_mass", "map_foreground_share", "map_foreground_lift", "map_entropy"}


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="both be"):
        map_quality(torch.ones(2, 16), torch.ones(2, 15, dtype=torch.bool))
