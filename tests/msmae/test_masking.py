"""SAM masking: exact counts, disjoint sets, weighted draw, validation, reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from msmae.masking import mask_counts, random_masking, sam_masking


@pytest.mark.parametrize("num_patches", [4, 16, 49, 64, 196, 256])
@pytest.mark.parametrize("mask_ratio,throw_ratio", [(0.45, 0.30), (0.75, 0.0), (0.1, 0.6), (0.5, 0.25), (0.29, 0.31), (0.6, 0.15)])
def test_counts_are_exact_and_sets_partition_the_patches(num_patches, mask_ratio, throw_ratio, device, generator):
    expected_masked = math.floor(num_patches * mask_ratio + 1e-9)
    expected_thrown = math.floor(num_patches * (mask_ratio + throw_ratio) + 1e-9) - expected_masked
    expected_kept = num_patches - expected_masked - expected_thrown
    if expected_masked < 1 or expected_kept < 1:
        with pytest.raises(ValueError):
            mask_counts(num_patches, mask_ratio, throw_ratio)
        return
    weights = torch.rand(8, num_patches, device=device)
    split = sam_masking(weights, mask_ratio, throw_ratio, generator)
    assert split.masked.shape == (8, expected_masked)
    assert split.thrown.shape == (8, expected_thrown)
    assert split.kept.shape == (8, expected_kept)
    everything = torch.cat([split.kept, split.masked, split.thrown], dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(num_patches, device=device).expand(8, -1))


def test_paper_defaults_keep_49_of_196():
    assert mask_counts(196, 0.45, 0.30) == (49, 88, 59)


def test_float_ratios_count_as_written():
    # 0.29 * 100 is 28.999999999999996 in floating point; the count must still be 29.
    assert mask_counts(100, 0.29, 0.0) == (71, 29, 0)


@pytest.mark.parametrize(
    "mask_ratio,throw_ratio,named",
    [(0.0, 0.3, "mask_ratio=0.0"), (-0.1, 0.3, "mask_ratio=-0.1"), (0.5, -0.1, "throw_ratio=-0.1"),
     (0.7, 0.3, "throw_ratio=0.3"), (0.01, 0.3, "mask_ratio=0.01")],
)
def test_bad_ratios_raise_value_error_naming_the_value(mask_ratio, throw_ratio, named):
    with pytest.raises(ValueError) as err:
        sam_masking(torch.ones(2, 16), mask_ratio, throw_ratio)
    assert named in str(err.value)


def test_leaving_no_visible_token_is_rejected():
    with pytest.raises(ValueError, match="visible"):
        mask_counts(196, 0.5, 0.5)


def test_high_attention_patches_are_masked_far_more_often_than_under_uniform(device, generator):
    num_patches, trials = 64, 4000
    peaked = torch.full((trials, num_patches), 0.01, device=device)
    hot = torch.arange(8, device=device)  # 8 patches carrying the attention
    peaked[:, hot] = 1.0
    split = sam_masking(peaked, 0.25, 0.25, generator)  # 16 masked, 16 thrown, 32 kept
    hot_masked_rate = torch.isin(split.masked, hot).sum().item() / (trials * len(hot))
    uniform = sam_masking(torch.ones_like(peaked), 0.25, 0.25, generator)
    uniform_rate = torch.isin(uniform.masked, hot).sum().item() / (trials * len(hot))
    # Uniform: each patch is masked with probability 16/64 = 0.25. Weighted: the 8 hot
    # patches are almost always drawn among the first 16. Both have tiny sampling error
    # (sd ~ 0.0024 at 32,000 draws), so these bounds only fail if the draw is wrong.
    assert abs(uniform_rate - 0.25) < 0.015
    assert hot_masked_rate > 0.9
    kept_hot = torch.isin(split.kept, hot).sum().item() / (trials * len(hot))
    assert kept_hot < 0.01


def test_weighted_draw_matches_sequential_sampling_probabilities(device, generator):
    # First-drawn patch must follow p_i = w_i / sum(w): a direct check of the Gumbel trick.
    weights = torch.tensor([[4.0, 2.0, 1.0, 1.0]], device=device).expand(20000, -1)
    split = sam_masking(weights, 0.25, 0.0, generator)  # masked = the first drawn patch
    freq = torch.bincount(split.masked[:, 0], minlength=4).float().cpu() / 20000
    expected = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert torch.allclose(freq, expected, atol=0.015), freq


def test_uniform_weights_give_uniform_masking(device, generator):
    num_patches, trials = 16, 16000
    split = random_masking(trials, num_patches, 0.5, generator, device)
    counts = torch.bincount(split.masked.flatten(), minlength=num_patches).float().cpu()
    expected = trials * 8 / num_patches
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    # chi-square with 15 dof: P(chi2 > 37.7) = 0.001.
    assert chi2 < 37.7, counts
    assert split.thrown.shape == (trials, 0)


@pytest.mark.parametrize(
    "weights",
    [
        torch.zeros(4, 64),
        torch.nn.functional.one_hot(torch.arange(4), 64).float(),
        torch.cat([torch.zeros(4, 32), torch.ones(4, 32)], dim=1),
    ],
    ids=["all-zero", "one-hot", "half-zero"],
)
def test_maps_with_zeros_give_valid_splits(weights, device, generator):
    split = sam_masking(weights.to(device), 0.45, 0.30, generator)
    everything = torch.cat(split, dim=1).sort(dim=1).values
    assert torch.equal(everything, torch.arange(64, device=device).expand(4, -1))


def test_nan_weights_are_rejected():
    weights = torch.ones(2, 16)
    weights[0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sam_masking(weights)


def test_same_generator_seed_gives_same_split(device):
    weights = torch.rand(16, 196, device=device)
    a = sam_masking(weights, 0.45, 0.3, torch.Generator(device=device).manual_seed(7))
    b = sam_masking(weights, 0.45, 0.3, torch.Generator(device=device).manual_seed(7))
    c = sam_masking(weights, 0.45, 0.3, torch.Generator(device=device).manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.masked, c.masked)
