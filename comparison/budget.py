"""How long a comparison will take, from step times measured on the device it runs on.

A comparison on a lent GPU has a fixed slot. Rather than guess epochs from another card's
numbers, ``calibrate`` times a few real steps of each kind (with the real augmentation and
batch size), ``estimate_run`` turns them into seconds per (method, seed), and
``fit_epochs`` scales the epochs down until every planned run fits the budget.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import torch

import msmae
from comparison.augment import TrainBatches, eval_batches
from comparison.runner import DeviceData, Method, Recipe


@dataclass(frozen=True)
class StepTimes:
    """Seconds per training step (one batch) by kind, per evaluated image, and per run set-up."""

    pretrain_random: float
    pretrain_sam: float
    finetune_all: float
    finetune_sam: float
    eval_image: float
    setup: float  # building models and optimisers, copying the best state, the test pass overhead

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def _time_steps(run_steps, count: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run_steps(count)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / count


def calibrate(recipe: Recipe, data: DeviceData, device: torch.device | str, warmup: int = 3, steps: int = 5) -> StepTimes:
    """Time ``steps`` steps of each kind after ``warmup`` (throwaway models; nothing is kept)."""
    device = torch.device(device)
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = TrainBatches(data.train, data.train_labels, data.train_aspect, recipe.img_size, recipe.batch_size, gen)
    table = msmae.AttentionTable(len(data.train), preset.grid, device=device)

    def stream():
        while True:
            yield from batches

    times = {}
    setup_start = time.perf_counter()
    pre = msmae.build_pretrain_model(preset, data.num_classes).to(device)
    pre_opt = msmae.build_optimizer(pre, "pretrain", weight_decay=recipe.pretrain_weight_decay)
    cls = msmae.build_classifier(preset, data.num_classes, drop_path_rate=recipe.drop_path).to(device)
    cls_opt = msmae.build_optimizer(cls, "finetune", weight_decay=recipe.finetune_weight_decay, layer_decay=recipe.layer_decay)
    setup = time.perf_counter() - setup_start
    for name, model, opt, stage, phase in [
        ("pretrain_random", pre, pre_opt, "pretrain", "random"),
        ("pretrain_sam", pre, pre_opt, "pretrain", "sam"),
        ("finetune_all", cls, cls_opt, "finetune", "random"),
        ("finetune_sam", cls, cls_opt, "finetune", "sam"),
    ]:
        plan = msmae.EpochPlan(stage, phase, recipe.ratios)
        source = stream()

        def run(n: int) -> None:
            msmae.train_one_epoch(model, opt, itertools.islice(source, n), plan, table, lambda e: 1e-5, 0, n, gen)

        run(warmup)
        times[name] = _time_steps(run, steps, device)
    n_eval = min(len(data.val), 2 * recipe.eval_batch_size)

    def run_eval(_: int) -> None:
        msmae.evaluate(cls, eval_batches(data.val[:n_eval], data.val_labels[:n_eval], recipe.eval_batch_size), data.num_classes)

    run_eval(1)
    eval_image = _time_steps(run_eval, 2, device) / n_eval
    del pre, pre_opt, cls, cls_opt
    return StepTimes(eval_image=eval_image, setup=setup + 0.2, **times)


def estimate_run(
    method: Method, recipe: Recipe, counts: dict[str, int], t: StepTimes, pretrain_shared: bool = False, finetune_epochs: int | None = None,
) -> float:
    """Seconds one (method, seed) takes: training steps, map refreshes, validation, test, set-up.
    ``finetune_epochs``: the run's fine-tuning epochs where they are not the recipe's (an
    equal-FLOPs row); a CNN's steps are taken to cost an all-token ViT step's."""
    steps = counts["train"] // recipe.batch_size
    refresh = counts["train"] * t.eval_image
    seconds = t.setup + counts["test"] * t.eval_image
    if method.pretrain != "none" and not pretrain_shared:
        e1 = recipe.pretrain_epochs
        if method.pretrain == "msmae":
            sam_epochs = max(0, e1 - recipe.sam_start)
            refreshes = len(msmae.MaskingSchedule(recipe.sam_start, recipe.refresh_every).refresh_epochs(e1))
            refreshes *= method.pretrain_strategy == "attention"  # the uniform rule needs no maps
        else:
            sam_epochs, refreshes = 0, 0
        seconds += steps * ((e1 - sam_epochs) * t.pretrain_random + sam_epochs * t.pretrain_sam) + refreshes * refresh
    e2 = recipe.supervised_epochs() if method.pretrain == "none" else recipe.finetune_epochs
    e2 = finetune_epochs if finetune_epochs is not None else e2
    step = t.finetune_sam if method.finetune_sam else t.finetune_all
    seconds += e2 * (steps * step + counts["val"] * t.eval_image)
    if method.finetune == "attention" and not method.frozen_maps:
        seconds += len(msmae.MaskingSchedule(0, recipe.finetune_refresh_every).refresh_epochs(e2)) * refresh
    return seconds


def plan_runs(methods: list[Method], seeds: list[int]) -> list[tuple[int, Method, bool]]:
    """Seed-major order (every method for seed 0, then seed 1, ...), so a run cut short stays
    balanced across methods; each entry says whether its pre-training is reused from an earlier run."""
    order = []
    for seed in seeds:
        seen: set[tuple] = set()
        for m in methods:
            key = m.pretrain_key
            order.append((seed, m, m.pretrain != "none" and key in seen))
            seen.add(key)
    return order


def estimate_total(
    methods: list[Method], seeds: list[int], recipe: Recipe, counts: dict[str, int], t: StepTimes, runs_per_method: float = 1.0,
) -> float:
    """All planned runs; ``runs_per_method`` scales for a learning-rate grid (runs per method and seed)."""
    return runs_per_method * sum(estimate_run(m, recipe, counts, t, shared) for _, m, shared in plan_runs(methods, seeds))


def fit_epochs(
    recipe: Recipe, methods: list[Method], seeds: list[int], counts: dict[str, int], t: StepTimes,
    budget_seconds: float, safety: float = 1.15, rescale=None, runs_per_method: float = 1.0,
) -> tuple[Recipe, float]:
    """The longest recipe (both stages scaled by the same factor, at most the given epochs)
    whose estimated total × ``safety`` fits ``budget_seconds``; with ``rescale(e1, e2)`` building
    the recipe for other epochs (default: ``replace`` of the two epoch counts)."""
    rescale = rescale or (lambda e1, e2: replace(recipe, pretrain_epochs=e1, finetune_epochs=e2))
    best = None
    for pct in range(100, 0, -2):
        e1 = max(1, round(recipe.pretrain_epochs * pct / 100))
        e2 = max(1, round(recipe.finetune_epochs * pct / 100))
        candidate = rescale(e1, e2)
        total = estimate_total(methods, seeds, candidate, counts, t, runs_per_method)
        best = (candidate, total)
        if total * safety <= budget_seconds:
            return best
    return best  # even one epoch each does not fit: the smallest, and the time budget cuts runs
