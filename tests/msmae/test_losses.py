"""Losses: only masked patches count; CE takes raw logits; patchify round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msmae.losses import balanced_class_weights, patchify, pretrain_loss, reconstruction_loss, unpatchify
from msmae.masking import sam_masking


def test_patchify_round_trips():
    images = torch.randn(2, 3, 32, 48)
    patches = patchify(images, 8)
    assert patches.shape == (2, 4 * 6, 192)
    torch.testing.assert_close(unpatchify(patches, 8, (4, 6)), images)


def test_loss_ignores_thrown_and_kept_patches(generator, device):
    images = torch.randn(2, 3, 64, 64, device=device)
    split = sam_masking(torch.rand(2, 64, device=device), 0.45, 0.30, generator)
    pred = torch.randn(2, split.masked.shape[1], 192, device=device)
    base = reconstruction_loss(pred, images, split.masked, 8)

    patches = patchify(images, 8)
    for hidden_from_loss in (split.kept, split.thrown):
        changed = patches.clone()
        for b in range(2):
            changed[b, hidden_from_loss[b]] += 100.0
        loss = reconstruction_loss(pred, unpatchify(changed, 8, (8, 8)), split.masked, 8)
        torch.testing.assert_close(loss, base)

    changed = patches.clone()
    changed[0, split.masked[0, 0]] += 100.0
    assert reconstruction_loss(pred, unpatchify(changed, 8, (8, 8)), split.masked, 8) > base + 1


def test_loss_is_mse_against_the_masked_patches_in_order(generator):
    images = torch.randn(3, 3, 64, 64)
    split = sam_masking(torch.rand(3, 64), 0.5, 0.0, generator)
    target = torch.stack([patchify(images, 8)[b, split.masked[b]] for b in range(3)])
    torch.testing.assert_close(reconstruction_loss(target, images, split.masked, 8), torch.tensor(0.0))


def test_norm_pix_loss_standardises_each_target_patch(generator):
    images = torch.randn(1, 3, 64, 64) * 5 + 3
    split = sam_masking(torch.rand(1, 64), 0.5, 0.0, generator)
    target = patchify(images, 8)[0, split.masked[0]]
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    loss = reconstruction_loss(normalised[None], images, split.masked, 8, norm_pix_loss=True)
    assert loss.item() < 1e-8


def test_classification_term_is_plain_cross_entropy_on_logits(generator):
    images = torch.randn(2, 3, 64, 64)
    split = sam_masking(torch.rand(2, 64), 0.45, 0.3, generator)
    pred = torch.zeros(2, split.masked.shape[1], 192)
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.5, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    total, recon, cls = pretrain_loss(pred, logits, images, labels, split.masked, 8, cls_weight=0.1)
    torch.testing.assert_close(cls, F.cross_entropy(logits, labels))
    # Softmax applied twice (the reference's defect) would give a different, flatter value.
    assert not torch.allclose(cls, F.cross_entropy(logits.softmax(-1), labels))
    torch.testing.assert_close(total, recon + 0.1 * cls)


def test_balanced_class_weights_make_every_class_count_equally():
    weights = balanced_class_weights([60, 30, 10, 0])
    counts = torch.tensor([60.0, 30.0, 10.0, 0.0])
    # each present class's summed weight is total / classes present; an absent class weighs 0, not inf
    torch.testing.assert_close(weights * counts, torch.tensor([100 / 3, 100 / 3, 100 / 3, 0.0]))
    torch.testing.assert_close(balanced_class_weights([5, 5, 5]), torch.ones(3))
    with pytest.raises(ValueError, match="class counts"):
        balanced_class_weights([0, 0])


def test_class_weights_reweight_the_cls_term(generator):
    images = torch.randn(2, 3, 64, 64)
    split = sam_masking(torch.rand(2, 64), 0.45, 0.3, generator)
    pred = torch.zeros(2, split.masked.shape[1], 192)
    logits, labels = torch.tensor([[4.0, 0.0], [0.5, 0.2]]), torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0])
    _, _, cls = pretrain_loss(pred, logits, images, labels, split.masked, 8, class_weights=weights)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(cls, (per_image * weights[labels]).sum() / weights[labels].sum())


def test_softmax_ce_is_the_released_codes_cls_term(generator):
    """cls_loss="softmax_ce": softmax, then a cross-entropy that treats the probabilities as logits
    (the released code); the default stays on logits, and an unknown name is refused."""
    from msmae.losses import cls_cross_entropy

    images = torch.randn(2, 3, 64, 64)
    split = sam_masking(torch.rand(2, 64), 0.45, 0.3, generator)
    pred = torch.zeros(2, split.masked.shape[1], 192)
    logits, labels = torch.tensor([[4.0, 0.0, -1.0], [0.5, 0.2, 3.0]]), torch.tensor([0, 1])
    _, _, released = pretrain_loss(pred, logits, images, labels, split.masked, 8, cls_loss="softmax_ce")
    probs = logits.softmax(-1)
    by_hand = -(probs[torch.arange(2), labels] - probs.exp().sum(-1).log()).mean()  # CE on probs as logits
    torch.testing.assert_close(released, by_hand)
    torch.testing.assert_close(cls_cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    # bounded: a perfectly confident right answer still costs about log(C) - 1 + ..., never near 0
    confident = cls_cross_entropy(torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([0]), "softmax_ce")
    assert confident.item() == pytest.approx(-(1 - torch.tensor([1.0, 0.0, 0.0]).exp().sum().log()).item(), rel=1e-5)
    with pytest.raises(ValueError, match="cls_loss"):
        cls_cross_entropy(logits, labels, "hinge")
