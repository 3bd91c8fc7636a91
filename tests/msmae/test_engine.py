"""Step functions end to end on a tiny synthetic set: losses must fall; the table round-trips."""

from __future__ import annotations

import torch

from msmae.engine import MaskRatios, compute_attention_maps, draw_masks, evaluate, finetune_step, pretrain_step
from msmae.models import build_classifier, build_pretrain_model, load_pretrained_encoder
from msmae.optim import layer_decay_param_groups
from msmae.schedules import MaskingSchedule, set_lr
from msmae.table import AttentionTable


def _synthetic_set(device, n=16):
    """Two classes: a bright square in the top-left vs the bottom-right, on noise."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 64, 64, generator=g) * 0.3
    labels = torch.arange(n) % 2
    images[labels == 0, :, 8:24, 8:24] += 2.0
    images[labels == 1, :, 40:56, 40:56] += 2.0
    return images.to(device), labels.to(device)


def test_pretraining_loss_falls_through_random_and_sam_phases(device):
    torch.manual_seed(0)
    images, labels = _synthetic_set(device)
    model = build_pretrain_model("tiny", 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    schedule = MaskingSchedule(sam_start=20, refresh_every=10)
    table = AttentionTable(len(images), model.preset.grid)
    generator = torch.Generator(device=device).manual_seed(0)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(images), device=device)
    no_flip = torch.zeros(len(images), dtype=torch.bool, device=device)
    index = torch.arange(len(images), device=device)
    losses = []
    for step in range(40):
        if schedule.refresh_due(step):
            idx, maps = compute_attention_maps(model, [(images[:10], index[:10]), (images[10:], index[10:])])
            table.update(idx, maps, epoch=step)
        weights = table.batch_weights(index, whole, no_flip, device=device)
        split = draw_masks(schedule.phase(step), MaskRatios(), len(images), 64, weights, generator, device)
        out = pretrain_step(model, optimizer, images, labels, split, cls_weight=0.1)
        losses.append(out.reconstruction.item())
    assert table.refreshed_at == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses


def test_finetuning_on_kept_tokens_learns_and_evaluates_on_whole_images(device):
    torch.manual_seed(0)
    images, labels = _synthetic_set(device, n=32)
    pretrain = build_pretrain_model("tiny", 2)
    model = build_classifier("tiny", 2, drop_path_rate=0.0).to(device)
    load_pretrained_encoder(model, pretrain)
    optimizer = torch.optim.AdamW(layer_decay_param_groups(model, 0.05, 0.75))
    set_lr(optimizer, 1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    losses = []
    for _ in range(50):
        split = draw_masks("random", MaskRatios(random_mask=0.5), len(images), 64, generator=generator, device=device)
        losses.append(finetune_step(model, optimizer, images, labels, split.kept, label_smoothing=0.0).item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    report, probs, seen_labels = evaluate(model, [(images[:20], labels[:20]), (images[20:], labels[20:])], 2)
    assert probs.shape == (32, 2) and torch.equal(seen_labels, labels.cpu())
    assert report.accuracy >= 0.9


def test_attention_table_round_trips_through_a_state_dict():
    table = AttentionTable(10, (4, 4))
    table.update(torch.tensor([3, 7]), torch.rand(2, 16), epoch=5)
    restored = AttentionTable.from_state_dict(table.state_dict())
    assert torch.equal(restored.maps, table.maps) and restored.refreshed_at == 5


def test_attention_table_rejects_unknown_indices():
    import pytest

    with pytest.raises(IndexError, match="out of range"):
        AttentionTable(4, (2, 2)).update(torch.tensor([4]), torch.rand(1, 4))
