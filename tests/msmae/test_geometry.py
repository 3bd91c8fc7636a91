"""Map geometry: a cropped/flipped map equals cropping/flipping an image that *is* the map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msmae.geometry import crop_flip_maps


def _map_as_image_then_augmented(maps, grid, box, flip, out_grid, pixels_per_patch=64):
    """The slow, obviously-right path: paint the map as an image (each patch one flat
    square of its weight), crop the box in pixels, flip it, average each output patch."""
    gh, gw = grid
    image = maps.reshape(gh, gw).repeat_interleave(pixels_per_patch, 0).repeat_interleave(pixels_per_patch, 1)
    height, width = image.shape
    x0, y0, x1, y1 = box
    crop = image[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)]
    if flip:
        crop = crop.flip(-1)
    return F.adaptive_avg_pool2d(crop[None, None], out_grid).reshape(-1)


BOXES = [
    (0.0, 0.0, 1.0, 1.0),
    (0.25, 0.125, 0.75, 0.625),
    (0.0, 0.5, 0.5, 1.0),
    (0.375, 0.0, 1.0, 0.4375),
    (0.125, 0.25, 0.4375, 0.5625),
]


@pytest.mark.parametrize("flip", [False, True])
def test_crop_flip_matches_augmenting_the_upsampled_map(flip, device):
    torch.manual_seed(0)
    grid = (8, 8)
    maps = torch.rand(len(BOXES), 64, device=device)
    boxes = torch.tensor(BOXES, device=device)
    flipped = torch.full((len(BOXES),), flip, device=device)
    out = crop_flip_maps(maps, grid, boxes, flipped)
    for i, box in enumerate(BOXES):
        expected = _map_as_image_then_augmented(maps[i].cpu(), grid, box, flip, grid)
        torch.testing.assert_close(out[i].cpu(), expected, atol=2e-4, rtol=0)


def test_whole_image_without_flip_is_identity(device):
    maps = torch.rand(4, 196, device=device)
    out = crop_flip_maps(maps, (14, 14), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4, device=device), torch.zeros(4, dtype=torch.bool, device=device))
    torch.testing.assert_close(out, maps, atol=1e-6, rtol=0)


def test_flip_mirrors_columns(device):
    maps = torch.rand(2, 49, device=device)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2, device=device)
    out = crop_flip_maps(maps, (7, 7), whole, torch.tensor([True, False], device=device))
    torch.testing.assert_close(out[0].reshape(7, 7), maps[0].reshape(7, 7).flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], maps[1], atol=1e-6, rtol=0)


def test_weight_follows_its_patch_into_the_crop(device):
    # One hot patch at row 2, column 5 of an 8x8 map. Crop the right half (x 0.5..1),
    # stretched x2 horizontally: source column 5 covers output columns 2 and 3 of row 2.
    maps = torch.zeros(1, 64, device=device)
    maps[0, 2 * 8 + 5] = 1.0
    out = crop_flip_maps(maps, (8, 8), torch.tensor([[0.5, 0.0, 1.0, 1.0]], device=device), torch.tensor([False], device=device))
    expected = torch.zeros(8, 8, device=device)
    expected[2, 2:4] = 1.0
    torch.testing.assert_close(out.reshape(8, 8), expected)
    flipped = crop_flip_maps(maps, (8, 8), torch.tensor([[0.5, 0.0, 1.0, 1.0]], device=device), torch.tensor([True], device=device))
    torch.testing.assert_close(flipped.reshape(8, 8), expected.flip(-1))


def test_output_grid_may_differ(device):
    maps = torch.rand(3, 64, device=device)
    out = crop_flip_maps(maps, (8, 8), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3, device=device), torch.zeros(3, dtype=torch.bool, device=device), out_grid=(16, 16))
    assert out.shape == (3, 256)
    # Each source patch becomes a 2x2 block of the finer output grid.
    upsampled = maps.reshape(3, 8, 8).repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(3, 256)
    torch.testing.assert_close(out, upsampled)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="maps must be"):
        crop_flip_maps(torch.rand(2, 60), (8, 8), torch.zeros(2, 4), torch.zeros(2, dtype=torch.bool))
