"""Register tokens: an option that changes no patch bookkeeping (maps, masking, decoder, fine-tuning head)."""

from __future__ import annotations

import torch

import msmae


def test_registers_sit_beside_cls_and_everything_patch_shaped_is_unchanged(device):
    preset = msmae.get_preset("tiny", 32, reg_tokens=4)
    assert preset.num_prefix_tokens == 5
    pretrain = msmae.build_pretrain_model(preset, 3).to(device)
    images = torch.randn(2, 3, 32, 32, device=device)
    split = msmae.sam_masking(torch.ones(2, preset.num_patches, device=device))
    assert msmae.encode(pretrain.encoder, images, split.kept).shape[1] == 5 + split.kept.shape[1]
    pred, logits = pretrain(images, split)
    assert pred.shape == (2, split.masked.shape[1], 8 * 8 * 3) and logits.shape == (2, 3)
    maps = msmae.attention_maps(pretrain, images)
    assert maps.shape == (2, preset.num_patches)  # registers are not patches: no weight for them
    classifier = msmae.build_classifier(preset, 3).to(device)
    msmae.load_pretrained_encoder(classifier, pretrain)
    assert torch.equal(classifier.reg_token, pretrain.encoder.reg_token)
    assert classifier(images).shape == (2, 3) and classifier(images, split.kept).shape == (2, 3)


def test_no_registers_by_default():
    assert msmae.get_preset("tiny").reg_tokens == 0
    assert msmae.build_classifier("tiny", 2).reg_token is None
