"""`train_one_epoch`: both stages and both phases, the table on the training device, unaligned maps."""

from __future__ import annotations

import pytest
import torch

import msmae
from msmae.loop import EpochPlan, batch_weights, train_one_epoch
from msmae.table import AttentionTable


def _batches(device, n=16, batch=8, flip_all=False):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 64, 64, generator=g).to(device)
    labels = (torch.arange(n) % 2).to(device)
    boxes = torch.tensor([[0.0, 0.0, 0.5, 1.0]] * n, device=device)  # left half of each image
    flipped = torch.full((n,), flip_all, dtype=torch.bool, device=device)
    index = torch.arange(n, device=device)
    return [
        {"image": images[i:i + batch], "label": labels[i:i + batch], "index": index[i:i + batch],
         "crop_box": boxes[i:i + batch], "flipped": flipped[i:i + batch]}
        for i in range(0, n, batch)
    ]


def _table(device, n=16, grid=(8, 8)):
    table = AttentionTable(n, grid, device=device)
    maps = torch.zeros(n, grid[0] * grid[1])
    maps[:, 0] = 1.0  # all attention on the top-left patch
    table.update(torch.arange(n), maps, epoch=0)
    return table


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
@pytest.mark.parametrize("phase", ["random", "sam"])
def test_an_epoch_trains_every_stage_and_phase_and_sets_the_lr_per_step(device, stage, phase):
    torch.manual_seed(0)
    model = (msmae.build_pretrain_model("tiny", 2) if stage == "pretrain" else msmae.build_classifier("tiny", 2)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    seen_lrs = []

    def lr_at(fractional_epoch: float) -> float:
        seen_lrs.append(fractional_epoch)
        return 1e-3 * (1 + fractional_epoch)

    before = [p.detach().clone() for p in model.parameters()]
    totals = train_one_epoch(model, optimizer, _batches(device), EpochPlan(stage, phase), _table(device), lr_at, epoch=3, steps_per_epoch=2)
    assert totals.seen == 16
    assert seen_lrs == [3.0, 3.5]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 4.5)
    means = totals.means()
    expected = {"loss", "loss_recon", "loss_cls"} if stage == "pretrain" else {"loss"}
    expected |= {"tokens_seen", "seen_weight"}  # what the encoder saw, recorded with the losses
    assert set(means) == expected and all(v > 0 for k, v in means.items() if k != "seen_weight")  # the table's zeros can be all it saw
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def test_sam_phase_without_a_table_is_refused(device):
    model = msmae.build_classifier("tiny", 2).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="attention table"):
        train_one_epoch(model, optimizer, _batches(device), EpochPlan("finetune", "sam"), None, lambda e: 1e-3, 0, 2)


def test_aligned_maps_follow_the_flip_and_unaligned_maps_do_not(device):
    table = _table(device)
    batch = _batches(device, flip_all=True)[0]
    aligned = batch_weights(table, batch, EpochPlan("finetune", "sam", align_maps=True), 64)
    unaligned = batch_weights(table, batch, EpochPlan("finetune", "sam", align_maps=False), 64)
    assert aligned.device == batch["image"].device and unaligned.device == batch["image"].device
    # The stored map puts everything on the top-left patch; the left half, flipped, moves it to the top-right.
    assert torch.equal(unaligned, table.rows(batch["index"]))
    assert unaligned[0, 0] == 1.0 and unaligned[0, 7] == 0.0
    assert aligned[0, 7] > 0.9 and aligned[0, 0] < 0.1


def test_the_table_lives_on_the_training_device_and_saves_to_cpu(device):
    table = _table(device)
    assert table.maps.device.type == device.type
    state = table.state_dict()
    assert state["maps"].device.type == "cpu"
    restored = AttentionTable.from_state_dict(state, device)
    assert restored.maps.device.type == device.type and torch.equal(restored.maps.cpu(), table.maps.cpu())


def test_non_finite_losses_are_reported_when_read_back():
    totals = msmae.EpochTotals()
    totals.add({"loss": torch.tensor(float("nan"))}, 4)
    with pytest.raises(FloatingPointError, match="train loss"):
        totals.means()


def _kept_seen(model) -> list:
    """Record the ``kept`` argument of every forward call: the tokens the encoder saw (None = all)."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[1] if len(args) > 1 else None))
    return seen


def test_fine_tuning_strategies_decide_which_tokens_the_encoder_sees(device):
    """The table puts every image's attention on patch 0 (the flip-free crop is the whole image)."""
    batches = _batches(device, n=64, batch=32)
    for batch in batches:
        batch["crop_box"] = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(batch["image"]), device=device)
    table = _table(device, n=64)
    seen, recorded = {}, {}
    for strategy in ("attention", "uniform", "all"):
        torch.manual_seed(0)
        model = msmae.build_classifier("tiny", 2).to(device)
        seen[strategy] = _kept_seen(model)
        plan = EpochPlan("finetune", "sam", strategy=strategy)
        gen = torch.Generator(device=device).manual_seed(0)
        totals = train_one_epoch(model, torch.optim.AdamW(model.parameters()), batches, plan, table, lambda e: 1e-4, 0, 2, gen)
        recorded[strategy] = totals.means()
    attention, uniform = torch.cat(seen["attention"]), torch.cat(seen["uniform"])
    assert attention.shape == uniform.shape == (64, 16)  # 25 % of 64 patches visible either way
    assert not (attention == 0).any()  # the paper's rule: the high-attention patch is always hidden
    assert (uniform == 0).any()  # the released code's rule: patch 0 is as likely to be seen as any other
    assert seen["all"] == [None, None]  # every token
    # The epoch's record says the same: tokens per image and the draw weight of what was seen.
    assert [recorded[s]["tokens_seen"] for s in ("attention", "uniform", "all")] == [16, 16, 64]
    assert recorded["attention"]["seen_weight"] < 0.1 and recorded["uniform"]["seen_weight"] == 1.0


def test_uniform_pretraining_needs_no_table_and_all_is_fine_tuning_only(device):
    model = msmae.build_pretrain_model("tiny", 2).to(device)
    plan = EpochPlan("pretrain", "sam", strategy="uniform")
    totals = train_one_epoch(model, torch.optim.AdamW(model.parameters()), _batches(device), plan, None, lambda e: 1e-4, 0, 2)
    assert totals.seen == 16
    with pytest.raises(ValueError, match="pretrain masking strategy 'all'"):
        EpochPlan("pretrain", "sam", strategy="all")


def test_sam_can_stop_before_the_end_of_fine_tuning():
    schedule = msmae.MaskingSchedule(sam_start=0, refresh_every=2, sam_stop=3)
    assert [schedule.phase(e) for e in range(5)] == ["sam", "sam", "sam", "random", "random"]
    assert schedule.refresh_epochs(5) == [0, 2]
    assert msmae.MaskingSchedule.until_fraction(0, 2, 0.6, 5) == schedule  # 60 % of 5 epochs
    with pytest.raises(ValueError, match="before sam_start"):
        msmae.MaskingSchedule(sam_start=2, refresh_every=1, sam_stop=1)
