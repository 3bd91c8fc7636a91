"""Segmentation transfer: mask size equals input size, encoder transfer, Dice/IoU and the loss."""

from __future__ import annotations

import pytest
import torch

from msmae.models import ViTPreset, build_pretrain_model
from msmae.segmentation import MSMAESegmenter, build_segmenter, dice_bce_loss, dice_iou, load_encoder_for_segmentation


@pytest.mark.parametrize("size", [(48, 48), (37, 53), (150, 200), (1, 7)])
def test_logits_come_back_at_the_input_size_for_odd_sizes(device, size):
    model = build_segmenter("tiny", img_size=48, patch_size=8).to(device).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size, device=device))
    assert logits.shape == (2, 1, *size)
    assert torch.isfinite(logits).all()


def test_the_decoder_upsamples_the_token_grid_to_the_encoder_size(device):
    model = build_segmenter("tiny", img_size=48, patch_size=8).to(device).eval()
    with torch.no_grad():
        grid = model.token_grid(torch.randn(1, 3, 48, 48, device=device))
        assert grid.shape == (1, 192, 6, 6)
        assert model.decoder(grid).shape == (1, 1, 48, 48)  # 3 rounds of 2x for patch 8


def test_patch_sizes_that_are_not_powers_of_two_are_refused():
    with pytest.raises(ValueError, match="power of two"):
        build_segmenter("tiny", img_size=48, patch_size=12)


def test_pretrained_encoder_weights_are_loaded_including_the_final_norm(device):
    pretrain = build_pretrain_model("tiny", 4, img_size=48, patch_size=8)
    with torch.no_grad():
        for p in pretrain.encoder.parameters():
            p.add_(torch.randn_like(p))
    segmenter = build_segmenter("tiny", img_size=48, patch_size=8)
    load_encoder_for_segmentation(segmenter, pretrain.state_dict())
    for name, value in segmenter.encoder.state_dict().items():
        torch.testing.assert_close(value, pretrain.encoder.state_dict()[name], msg=name)
    images = torch.randn(2, 3, 48, 48)
    from msmae.models import encode
    with torch.no_grad():
        torch.testing.assert_close(
            segmenter.token_grid(images).flatten(2).transpose(1, 2), encode(pretrain.encoder, images)[:, 1:]
        )


def test_a_pretraining_of_another_size_is_refused_with_what_to_do():
    pretrain = build_pretrain_model("tiny", 4, img_size=64, patch_size=8)
    with pytest.raises(ValueError, match="build the segmenter with the pre-training's preset"):
        load_encoder_for_segmentation(build_segmenter("tiny", img_size=48, patch_size=8), pretrain.state_dict())
    with pytest.raises(ValueError, match="no 'encoder"):
        load_encoder_for_segmentation(build_segmenter("tiny", img_size=48, patch_size=8), {"decoder.x": torch.zeros(1)})


def test_dice_and_iou_on_known_masks():
    target = torch.zeros(4, 10, 10, dtype=torch.bool)
    target[:, :5] = True  # 50 pixels
    pred = torch.zeros_like(target)
    pred[0, :5] = True  # exact
    pred[1, :5, :5] = True  # 25 of the 50, none outside: dice 2*25/75, iou 25/50
    pred[2, 5:] = True  # disjoint
    # pred[3] empty against a non-empty target
    dice, iou = dice_iou(pred, target)
    torch.testing.assert_close(dice, torch.tensor([1.0, 50 / 75, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.5, 0.0, 0.0], dtype=torch.float64))
    empty = torch.zeros(1, 3, 3, dtype=torch.bool)
    assert dice_iou(empty, empty) == (torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))


def test_the_loss_prefers_the_true_mask_and_trains_a_segmenter(device):
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:12, 4:12] = 1
    right, wrong = (target * 2 - 1) * 8, (1 - target * 2) * 8
    assert dice_bce_loss(right, target) < 0.01 < 1.5 < dice_bce_loss(wrong, target)

    torch.manual_seed(0)
    small = ViTPreset(16, 4, 48, 2, 2, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    model = MSMAESegmenter(small, decoder_width=16).to(device)
    masks = torch.zeros(8, 1, 16, 16, device=device)
    for i in range(8):  # a bright square somewhere: the lesion is visible in the pixels
        r, c = 2 * (i % 4), 2 * (i // 2)
        masks[i, :, r:r + 6, c:c + 6] = 1
    images = 0.1 * torch.randn(8, 3, 16, 16, device=device) + 2 * masks
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = dice_bce_loss(model(images), masks)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    dice, _ = dice_iou(model(images) > 0, masks > 0)
    assert dice.mean() > 0.8, dice
    assert loss.item() < 0.5 * first
