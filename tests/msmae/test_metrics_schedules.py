"""Metrics against scikit-learn; lr and masking schedules."""

from __future__ import annotations

import math

import pytest
import torch

from msmae.metrics import classification_report, roc_auc_ovr
from msmae.optim import layer_decay_param_groups
from msmae.schedules import MaskingSchedule, cosine_lr, set_lr


def test_metrics_match_scikit_learn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(0)
    labels = torch.randint(0, 4, (300,))
    logits = torch.randn(300, 4) + 1.5 * torch.nn.functional.one_hot(labels, 4)
    probs = logits.softmax(-1)
    probs[:20] = probs[:20].round(decimals=1)  # create tied scores
    report = classification_report(probs, labels, 4)
    preds = probs.argmax(1).numpy()
    assert report.accuracy == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    assert report.balanced_accuracy == pytest.approx(sklearn_metrics.balanced_accuracy_score(labels, preds))
    assert report.macro_f1 == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))
    for c in range(4):
        expected = sklearn_metrics.roc_auc_score((labels == c).numpy(), probs[:, c].double().numpy())
        assert report.per_class_auc[c] == pytest.approx(expected)
    assert report.confusion == sklearn_metrics.confusion_matrix(labels, preds).tolist()


def test_auc_is_nan_for_a_class_without_positives():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    aucs = roc_auc_ovr(probs, torch.tensor([0, 1]), 3)
    assert aucs[0] == 1.0 and aucs[1] == 1.0 and math.isnan(aucs[2])


def test_perfect_and_majority_predictors():
    labels = torch.tensor([0] * 90 + [1] * 10)
    majority = torch.tensor([[1.0, 0.0]] * 100)
    report = classification_report(majority, labels, 2)
    assert report.accuracy == pytest.approx(0.9)
    assert report.balanced_accuracy == pytest.approx(0.5)  # the imbalance is not flattering
    perfect = torch.nn.functional.one_hot(labels, 2).float()
    assert classification_report(perfect, labels, 2).macro_f1 == 1.0


def test_cosine_lr_warms_up_then_decays_to_min():
    assert cosine_lr(0, 1e-3, 1e-6, 5, 50) == 0.0
    assert cosine_lr(2.5, 1e-3, 1e-6, 5, 50) == pytest.approx(5e-4)
    assert cosine_lr(5, 1e-3, 1e-6, 5, 50) == pytest.approx(1e-3)
    assert cosine_lr(27.5, 1e-3, 1e-6, 5, 50) == pytest.approx((1e-3 + 1e-6) / 2)
    assert cosine_lr(50, 1e-3, 1e-6, 5, 50) == pytest.approx(1e-6)


def test_pretraining_schedule_is_random_until_w_then_refreshes_every_k():
    schedule = MaskingSchedule(sam_start=40, refresh_every=40)
    assert schedule.phase(39) == "random" and schedule.phase(40) == "sam"
    assert schedule.refresh_epochs(300) == [40, 80, 120, 160, 200, 240, 280]


def test_finetuning_schedule_refreshes_at_zero_and_every_twenty():
    assert MaskingSchedule(sam_start=0, refresh_every=20).refresh_epochs(100) == [0, 20, 40, 60, 80]


def test_bad_schedule_values_are_rejected():
    with pytest.raises(ValueError, match="refresh_every"):
        MaskingSchedule(sam_start=0, refresh_every=0)


def test_layer_decay_gives_the_head_full_lr_and_early_blocks_less():
    from msmae.models import build_classifier

    model = build_classifier("tiny", 3)  # 6 blocks -> 8 layer ids (embed, 6 blocks, head)
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.75)
    optimizer = torch.optim.AdamW(groups)
    set_lr(optimizer, 1e-3)
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(model.head.weight)]["lr"] == pytest.approx(1e-3)
    assert by_param[id(model.patch_embed.proj.weight)]["lr"] == pytest.approx(1e-3 * 0.75**7)
    assert by_param[id(model.blocks[0].attn.qkv.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.05
