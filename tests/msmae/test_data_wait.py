"""An epoch's ``data_wait_fraction``: the share of training time the steps spent waiting for their batches."""

from __future__ import annotations

import time

import torch

import msmae
from msmae.loop import EpochPlan, StageSchedule, StageTrainer


def _slow(batches: list[dict], delay: float):
    """The batches, each after ``delay`` seconds: an input pipeline slower than the step."""
    for batch in batches:
        time.sleep(delay)
        yield batch


def _batches(n: int = 3, batch: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(batch, 3, 32, 32, generator=g), "label": torch.arange(batch) % 2, "index": torch.arange(batch),
             "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * batch), "flipped": torch.zeros(batch, dtype=torch.bool)}
            for _ in range(n)]


def test_the_wait_for_batches_is_measured_per_epoch():
    torch.manual_seed(0)
    model = msmae.build_classifier(msmae.get_preset("tiny", 32), 2)
    trainer = StageTrainer(model, torch.optim.AdamW(model.parameters()), EpochPlan("finetune", "random"), StageSchedule(2, 1e-3, 0.0, 0.0))
    batches = _batches()
    trainer.run_epoch(0, batches, 3)  # warm-up: first calls allocate
    fed = trainer.run_epoch(1, batches, 3)
    starved = trainer.run_epoch(1, _slow(batches, 0.4), 3)
    # absolute seconds, not fractions: the step's own time depends on the machine's load
    assert 0.0 <= fed.totals.data_wait_seconds < 0.1  # batches already in memory
    assert 1.2 <= starved.totals.data_wait_seconds < starved.train_seconds  # three batches, each 0.4 s late
    assert starved.data_wait_fraction == starved.totals.data_wait_seconds / starved.train_seconds > fed.data_wait_fraction
