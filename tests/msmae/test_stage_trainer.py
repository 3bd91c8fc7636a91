"""The shared epoch skeleton (`StageTrainer`), the one optimiser builder, the defaults declared once."""

from __future__ import annotations

import pytest
import torch

import msmae
from msmae import defaults
from msmae.loop import EpochPlan, StageSchedule, StageTrainer
from msmae.schedules import MaskingSchedule
from msmae.table import AttentionTable


def _batches(device, n=16, batch=8):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 64, 64, generator=g).to(device)
    return [
        {"image": images[i:i + batch], "label": (torch.arange(batch) % 2).to(device), "index": torch.arange(i, i + batch, device=device),
         "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * batch, device=device), "flipped": torch.zeros(batch, dtype=torch.bool, device=device)}
        for i in range(0, n, batch)
    ]


def _trainer(device, masking):
    torch.manual_seed(0)
    model = msmae.build_pretrain_model("tiny", 2).to(device)
    schedule = StageSchedule(epochs=4, peak_lr=1e-3, min_lr=0.0, warmup_epochs=1, masking=masking)
    table = AttentionTable(16, model.preset.grid, device=device)
    return StageTrainer(model, msmae.build_optimizer(model, "pretrain"), EpochPlan("pretrain", "random"), schedule, table)


def test_the_trainer_refreshes_on_schedule_and_switches_to_sam_after_the_warm_up(device):
    trainer = _trainer(device, MaskingSchedule(sam_start=2, refresh_every=1))
    refreshed_at = []

    def refresh(epoch: int) -> int:
        refreshed_at.append(epoch)
        return 16

    outcomes = [trainer.run_epoch(e, _batches(device), 2, refresh) for e in range(4)]
    assert [o.phase for o in outcomes] == ["random", "random", "sam", "sam"]
    assert [o.maps_refreshed for o in outcomes] == [0, 0, 16, 16]
    assert refreshed_at == [2, 3]
    assert all(o.totals.seen == 16 for o in outcomes)
    # The lr follows the schedule per step: after epoch 3's last step, 3.5 epochs into the cosine.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(trainer.schedule.lr_at(3.5))


def test_a_stage_without_masking_never_refreshes_and_stays_random(device):
    trainer = _trainer(device, None)
    outcome = trainer.run_epoch(0, _batches(device), 2)  # no refresh function needed
    assert outcome.phase == "random" and outcome.maps_refreshed == 0


def test_a_due_refresh_without_a_refresh_function_is_refused(device):
    trainer = _trainer(device, MaskingSchedule(sam_start=0, refresh_every=1))
    with pytest.raises(ValueError, match="refresh"):
        trainer.run_epoch(0, _batches(device), 2)


def test_build_optimizer_pretrain_uses_maes_betas_and_finetune_decays_by_layer():
    pre = msmae.build_optimizer(msmae.build_pretrain_model("tiny", 2), "pretrain")
    assert all(g["betas"] == defaults.PRETRAIN_BETAS for g in pre.param_groups)
    assert {g["weight_decay"] for g in pre.param_groups} == {0.0, defaults.WEIGHT_DECAY}
    fine = msmae.build_optimizer(msmae.build_classifier("tiny", 2), "finetune", layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in fine.param_groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** 7)  # 6 blocks + embeddings below the head
    with pytest.raises(ValueError, match="unknown stage"):
        msmae.build_optimizer(msmae.build_classifier("tiny", 2), "eval")


def test_the_papers_defaults_are_what_every_default_reads():
    ratios = msmae.MaskRatios()
    assert (ratios.mask, ratios.throw, ratios.random_mask) == (defaults.MASK_RATIO, defaults.THROW_RATIO, defaults.RANDOM_MASK_RATIO)
    plan = EpochPlan("pretrain", "random")
    assert (plan.cls_weight, plan.label_smoothing) == (defaults.CLS_WEIGHT, defaults.LABEL_SMOOTHING)
    assert (defaults.MASK_RATIO, defaults.THROW_RATIO, defaults.CLS_WEIGHT) == (0.45, 0.30, 0.1)
