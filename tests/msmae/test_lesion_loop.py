"""What the encoder saw of the lesion: batches that carry lesion masks record the lesion share of the visible
and of the masked patches; SAM by maps on the lesion hides it, a uniform draw does not."""

from __future__ import annotations

import pytest
import torch

import msmae
from msmae.loop import EpochPlan, train_one_epoch
from msmae.table import AttentionTable


def _batches(device, n=16, batch=8):
    """Whole, unflipped 64 px images whose lesion is the top-left quarter (16 of 64 patches); one image has no mask."""
    images = torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    masks = torch.zeros(n, 64, 64, dtype=torch.uint8)
    masks[:, :32, :32] = 1
    has_mask = torch.ones(n, dtype=torch.bool)
    has_mask[-1] = False
    masks[-1] = 0
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n)
    return [
        {"image": images[i:i + batch], "label": (torch.arange(n) % 2)[i:i + batch].to(device), "index": torch.arange(n)[i:i + batch].to(device),
         "crop_box": boxes[i:i + batch].to(device), "flipped": torch.zeros(batch, dtype=torch.bool, device=device),
         "mask": masks[i:i + batch].to(device), "has_mask": has_mask[i:i + batch].to(device)}
        for i in range(0, n, batch)
    ]


@pytest.mark.parametrize("strategy", ["attention", "uniform"])
def test_sam_by_maps_on_the_lesion_hides_it_from_the_encoder(device, strategy):
    torch.manual_seed(0)
    model = msmae.build_pretrain_model("tiny", 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    table = AttentionTable(16, (8, 8), device=device)
    lesion = torch.zeros(8, 8)
    lesion[:4, :4] = 1.0
    table.update(torch.arange(16), lesion.flatten().repeat(16, 1), epoch=0)
    plan = EpochPlan("pretrain", "sam", msmae.MaskRatios(0.25, 0.0), strategy=strategy)  # 16 masked, 48 kept
    means = train_one_epoch(model, optimizer, _batches(device), plan, table, lambda _: 1e-4, 0, 2,
                            torch.Generator(device=device).manual_seed(0)).means()
    assert means["lesion_patch_share"] == pytest.approx(0.25)  # averaged over the 15 images with a mask only
    if strategy == "attention":
        assert means["lesion_seen_share"] < 0.02 and means["lesion_masked_share"] > 0.95
    else:
        assert 0.1 < means["lesion_seen_share"] < 0.4


def test_no_masks_no_lesion_keys(device):
    model = msmae.build_classifier("tiny", 2).to(device)
    batches = [{k: v for k, v in b.items() if k not in ("mask", "has_mask")} for b in _batches(device)]
    means = train_one_epoch(model, torch.optim.AdamW(model.parameters()), batches, EpochPlan("finetune", "random"), None,
                            lambda _: 1e-4, 0, 2).means()
    assert not any(k.startswith("lesion") for k in means)
