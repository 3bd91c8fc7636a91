"""Bundles carry lesion masks; the runner refreshes maps from the recipe's source and scores them
(and any further sources) against the validation masks at every refresh."""

from __future__ import annotations

import torch

from comparison.bundle import load_bundle, make_bundle, pack_masks, save_bundle
from comparison.runner import METHODS, Recipe, load_device_data, pretrain


def _bundle_with_masks(side: int = 32):
    """48 / 16 / 16 images in 2 classes: a bright square (the 'lesion') at a random place; its mask."""
    g = torch.Generator().manual_seed(0)
    images, masks, labels, splits = [], [], [], []
    for k in range(80):
        img = torch.randint(0, 60, (3, side, side), generator=g, dtype=torch.uint8)
        top, left = (int(v) for v in torch.randint(0, side // 2, (2,), generator=g))
        img[:, top:top + side // 2, left:left + side // 2] += 150 if k % 2 else 100
        mask = torch.zeros(side, side, dtype=torch.bool)
        mask[top:top + side // 2, left:left + side // 2] = True
        images.append(img)
        masks.append(mask if k % 8 else None)  # every 8th image has no mask
        labels.append(k % 2)
        splits.append("train" if k < 48 else "val" if k < 64 else "test")
    bundle = make_bundle("lesions", ["a", "b"], images, labels, splits)
    bundle.mask, bundle.has_mask = pack_masks(masks, side)
    return bundle, masks


def test_masks_pack_and_unpack_exactly_and_old_bundles_load_without(tmp_path):
    bundle, masks = _bundle_with_masks()
    loaded = load_bundle(save_bundle(bundle, tmp_path / "b.pt"))
    unpacked = loaded.masks(torch.arange(80))
    for k, mask in enumerate(masks):
        assert torch.equal(unpacked[k], mask if mask is not None else torch.zeros(32, 32, dtype=torch.bool))
    assert loaded.has_mask.tolist() == [m is not None for m in masks]
    bundle.mask = bundle.has_mask = None
    old = torch.load(save_bundle(bundle, tmp_path / "old.pt"), weights_only=True)
    del old["mask"], old["has_mask"]  # a bundle written before masks existed
    torch.save(old, tmp_path / "old.pt")
    assert load_bundle(tmp_path / "old.pt").mask is None


def test_refreshes_score_the_maps_against_the_validation_masks(tmp_path):
    bundle, _ = _bundle_with_masks()
    data = load_device_data(load_bundle(save_bundle(bundle, tmp_path / "b.pt")), 32, "cpu")
    assert data.val_masks.shape == (16, 32, 32) and int(data.val_has_mask.sum()) == 14
    recipe = Recipe.for_epochs(2, 1, preset="tiny", img_size=32, patch_size=8, batch_size=16, eval_batch_size=32,
                               sam_start=1, refresh_every=1, map_source="rollout", lesion_sources=("cls_attention", "occlusion"))
    _, result = pretrain(METHODS["msmae"], recipe, data, 0, torch.device("cpu"))
    refreshed = [row for row in result.curve if row["maps_refreshed"]]
    assert refreshed
    row = refreshed[0]
    assert row["lesion_images"] == 14 and 0.0 <= row["lesion_mass"] <= 1.0 and 0.0 <= row["lesion_auroc"] <= 1.0
    assert 0.0 <= row["lesion_seen_share"] <= 1.0 and 0.0 <= row["lesion_masked_share"] <= 1.0
    for source in ("rollout", "cls_attention", "occlusion"):
        assert 0.0 <= row[f"{source}/lesion_pointing"] <= 1.0 and row[f"{source}/lesion_seconds_per_100"] > 0
    assert row["rollout/lesion_mass"] == row["lesion_mass"]
