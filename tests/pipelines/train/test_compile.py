"""``scaling.torch_compile``: the Ray worker's training model compiled, a last partial batch included."""

from __future__ import annotations

import math

import torch

import msmae
from msmae.loop import EpochPlan, StageSchedule, StageTrainer
from pipelines.config import ScalingConfig
from pipelines.train.worker import compile_for_training


def _batches(sizes: tuple[int, ...]) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(n, 3, 32, 32, generator=g), "label": torch.arange(n) % 2, "index": torch.arange(n),
             "crop_box": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * n), "flipped": torch.zeros(n, dtype=torch.bool)} for n in sizes]


def test_compile_is_off_on_cpu_by_default_and_on_with_gpus():
    model = torch.nn.Linear(2, 2)
    assert compile_for_training(model, ScalingConfig()) is model
    assert compile_for_training(model, ScalingConfig(torch_compile=False, use_gpu=True)) is model
    assert compile_for_training(model, ScalingConfig(use_gpu=True)) is not model


def test_a_compiled_epoch_completes_with_a_partial_last_batch():
    """Batches of 4, 4 and 3 through the compiled model: the third shape recompiles
    with a dynamic batch dimension instead of failing, and the epoch's losses are finite."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = msmae.build_classifier(msmae.get_preset("tiny", 32), 2, drop_path_rate=0.0)
    # aot_eager: dynamo's capture and AOTAutograd as in the worker (where a partial batch would break), without
    # inductor's C++ code generation, which took 4.5 min on the loaded 2-core machine
    compiled = compile_for_training(model, ScalingConfig(torch_compile=True), backend="aot_eager")
    assert compiled is not model and msmae.engine._unwrap(compiled).preset.img_size == 32
    trainer = StageTrainer(compiled, torch.optim.AdamW(model.parameters()), EpochPlan("finetune", "random"), StageSchedule(1, 1e-3, 0.0, 0.0))
    outcome = trainer.run_epoch(0, _batches((4, 4, 3)), 3)
    assert outcome.totals.seen == 11 and math.isfinite(outcome.totals.means()["loss"])
