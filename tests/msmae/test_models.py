"""Models: token routing (kept only in training, all at eval), presets, encoder transfer."""

from __future__ import annotations

import pytest
import torch

from msmae.masking import sam_masking
from msmae.models import PRESETS, build_classifier, build_pretrain_model, get_preset, load_pretrained_encoder


def _capture_block_input(vit):
    seen = {}
    hook = vit.blocks[0].register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach()))
    return seen, hook


def test_finetune_training_forward_sees_exactly_the_kept_tokens(device, generator):
    model = build_classifier("tiny", 4).to(device).train()
    images = torch.randn(2, 3, 64, 64, device=device)
    split = sam_masking(torch.rand(2, 64, device=device), 0.45, 0.30, generator)
    seen, hook = _capture_block_input(model)
    model(images, split.kept)
    hook.remove()
    assert seen["x"].shape == (2, 1 + split.kept.shape[1], 192)
    with torch.no_grad():
        all_tokens = model.patch_embed(images) + model.pos_embed[:, 1:]
    for b in range(2):  # token j of the encoder input is patch kept[b, j], with its own position
        torch.testing.assert_close(seen["x"][b, 1:], all_tokens[b, split.kept[b]])


def test_eval_forward_uses_all_tokens(device):
    model = build_classifier("tiny", 4).to(device).eval()
    seen, hook = _capture_block_input(model)
    model(torch.randn(2, 3, 64, 64, device=device))
    hook.remove()
    assert seen["x"].shape == (2, 65, 192)


def test_pretrain_encoder_sees_kept_and_decoder_predicts_masked_only(device, generator):
    model = build_pretrain_model("tiny", 3).to(device)
    split = sam_masking(torch.rand(4, 64, device=device), 0.45, 0.30, generator)
    seen, hook = _capture_block_input(model.encoder)
    decoder_seen = {}
    dhook = model.decoder_blocks[0].register_forward_hook(lambda m, i, o: decoder_seen.update(x=i[0]))
    pred, logits = model(torch.randn(4, 3, 64, 64, device=device), split)
    hook.remove(), dhook.remove()
    n_kept, n_masked = split.kept.shape[1], split.masked.shape[1]
    assert seen["x"].shape[1] == 1 + n_kept
    assert decoder_seen["x"].shape[1] == 1 + n_kept + n_masked  # thrown tokens are absent
    assert pred.shape == (4, n_masked, 8 * 8 * 3)
    assert logits.shape == (4, 3)


def test_pretrain_position_embeddings_are_fixed():
    model = build_pretrain_model("tiny", 3)
    assert not model.encoder.pos_embed.requires_grad
    assert "decoder_pos_embed" not in dict(model.named_parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_the_documented_sizes(name):
    preset = get_preset(name)
    model = build_pretrain_model(name, 2)
    assert model.encoder.embed_dim == preset.embed_dim
    assert len(model.encoder.blocks) == preset.depth
    assert model.encoder.patch_embed.num_patches == preset.num_patches


def test_base_preset_is_vit_b16_with_mae_decoder():
    base = get_preset("base")
    assert (base.img_size, base.patch_size, base.embed_dim, base.depth, base.num_heads) == (224, 16, 768, 12, 12)
    assert (base.decoder_dim, base.decoder_depth, base.decoder_heads) == (512, 8, 16)
    assert get_preset("tiny").embed_dim == 192


@pytest.mark.parametrize("img_size", [48, 80, 96])
def test_any_image_size_divisible_by_the_patch_works(img_size, device):
    model = build_classifier("tiny", 2, img_size=img_size).to(device)
    assert model(torch.randn(1, 3, img_size, img_size, device=device)).shape == (1, 2)


def test_indivisible_image_size_is_rejected_with_advice():
    with pytest.raises(ValueError, match="not divisible by patch_size=8"):
        get_preset("tiny", img_size=60)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="tiny"):
        get_preset("huge")


def test_pretrained_encoder_loads_into_classifier_with_new_head():
    torch.manual_seed(0)
    pretrain = build_pretrain_model("tiny", 4)
    classifier = build_classifier("tiny", 7)
    load_pretrained_encoder(classifier, pretrain.state_dict())
    torch.testing.assert_close(classifier.blocks[3].attn.qkv.weight, pretrain.encoder.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(classifier.patch_embed.proj.weight, pretrain.encoder.patch_embed.proj.weight)
    assert classifier.head.out_features == 7


def test_position_embeddings_are_interpolated_when_the_grid_changes():
    pretrain = build_pretrain_model("tiny", 4)  # 64 px -> 8x8
    classifier = build_classifier("tiny", 4, img_size=96)  # 12x12
    load_pretrained_encoder(classifier, pretrain)
    assert classifier.pos_embed.shape == (1, 1 + 144, 192)
    torch.testing.assert_close(classifier.pos_embed[0, 0], pretrain.encoder.pos_embed[0, 0])
    # The sin-cos field is smooth: the resampled corners match the original corners closely.
    src = pretrain.encoder.pos_embed[0, 1:].reshape(8, 8, 192)
    dst = classifier.pos_embed[0, 1:].reshape(12, 12, 192).detach()
    assert torch.nn.functional.cosine_similarity(src[0, 0], dst[0, 0], dim=0) > 0.95


def test_loading_a_mismatched_encoder_names_the_problem():
    with pytest.raises(ValueError, match="encoder"):
        load_pretrained_encoder(build_classifier("tiny", 2), {"foo": torch.zeros(1)})
    with pytest.raises((ValueError, RuntimeError)):
        load_pretrained_encoder(build_classifier("small", 2), build_pretrain_model("tiny", 2))
