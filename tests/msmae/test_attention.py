"""Attention maps: the fused-path CLS row equals timm's own unfused attention probabilities."""

from __future__ import annotations

import pytest
import torch

from msmae.attention import attention_maps, cls_attention, minmax_heads
from msmae.models import build_classifier, build_pretrain_model


def _reference_cls_attention(vit, images):
    """timm's slow path: every block unfused; the last block's probabilities captured
    as they enter ``attn_drop`` (softmax(q·kᵀ·scale), the full N x N matrix)."""
    captured = {}
    for block in vit.blocks:
        block.attn.fused_attn = False
    hook = vit.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, inp, out: captured.update(p=inp[0]))
    try:
        vit.forward_features(images)
    finally:
        hook.remove()
        for block in vit.blocks:
            block.attn.fused_attn = True
    return captured["p"][:, :, 0, :]  # CLS query row, [B, H, N]


@pytest.mark.parametrize("kind", ["pretrain", "classifier"])
def test_cls_row_equals_naive_softmax_reference(kind, device):
    torch.manual_seed(0)
    model = build_pretrain_model("tiny", 4) if kind == "pretrain" else build_classifier("tiny", 4)
    vit = (model.encoder if kind == "pretrain" else model).to(device).eval()
    images = torch.randn(3, 3, 64, 64, device=device)
    with torch.no_grad():
        fast = cls_attention(vit, images)
        reference = _reference_cls_attention(vit, images)
    assert fast.shape == (3, 3, 65)
    torch.testing.assert_close(fast, reference.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.sum(-1), torch.ones(3, 3, device=device), atol=1e-5, rtol=0)


def test_map_is_per_head_minmax_then_mean_over_heads(device):
    torch.manual_seed(1)
    model = build_pretrain_model("tiny", 4).to(device)
    images = torch.randn(2, 3, 64, 64, device=device)
    maps = attention_maps(model, images)
    with torch.no_grad():
        probs = _reference_cls_attention(model.encoder.eval(), images)[:, :, 1:].float()
    expected = torch.stack(
        [torch.stack([(h - h.min()) / (h.max() - h.min()) for h in sample]).mean(0) for sample in probs]
    )
    assert maps.shape == (2, 64)
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-4)
    assert maps.min() >= 0 and maps.max() <= 1


def test_attention_maps_restore_training_mode(device):
    model = build_classifier("tiny", 4).to(device).train()
    attention_maps(model, torch.randn(1, 3, 64, 64, device=device))
    assert model.training


def test_constant_head_contributes_zeros_not_nan():
    flat = torch.full((1, 2, 16), 1 / 16)
    flat[0, 1, 0] = 0.5
    out = minmax_heads(flat)
    assert torch.isfinite(out).all()
    assert out[0, 0].item() == pytest.approx(0.5)  # head 1 has its max there; head 0 adds 0
