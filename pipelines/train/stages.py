"""The two-stage runner: pre-training then fine-tuning as Ray Train jobs, for `msmae run` and sweep trials alike.

``msmae run`` / ``pretrain`` / ``finetune`` and every trial of ``msmae tune`` train through
``train_stages``; they differ only in which stages run, where fine-tuning starts from, and
who listens to the fine-tuning epochs (a sweep passes Tune's report callback).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray.train

from pipelines.config import RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.train.launcher import run_stage
from pipelines.train.worker import Stage, StageSpec


@dataclass(frozen=True)
class StagesResult:
    pretrain_checkpoint: str | None  # the last pre-training checkpoint (what fine-tuning started from)
    best_checkpoint: str | None  # the fine-tuning checkpoint with the best validation metric; None without fine-tuning
    best_score: float


def best_checkpoint(result: ray.train.Result, metric: str) -> tuple[str, float]:
    """The fine-tuning checkpoint with the best validation metric, and that metric's value.

    Ray keeps the ``checkpoint.keep`` best by score, plus always the latest (for resuming).
    """
    candidates = [(m.get(metric, float("-inf")), c.path) for c, m in (result.best_checkpoints or [])]
    if not candidates:
        return result.checkpoint.path, float("nan")
    score, path = max(candidates)
    return path, score


def train_stages(
    cfg: RunConfig,
    dataset: IngestedDataset,
    storage: Path,
    name: str,
    *,
    stages: Sequence[Stage] = ("pretrain", "finetune"),
    init_checkpoint: str | None = None,
    mlflow_uri: str | None = None,
    mlflow_run_id: str | None = None,
    finetune_callbacks: list | None = None,
    on_pretrained: Callable[[str], None] | None = None,
    fail_at_epoch: int | None = None,
    log: Callable[[str], None] = print,
) -> StagesResult:
    """Run ``stages`` in order (Ray restores each from ``storage/<name>-<stage>`` when it exists).

    Fine-tuning starts from this call's pre-training, else from ``init_checkpoint``, else from
    random weights (a supervised ViT from scratch). ``fail_at_epoch`` (tests) makes one worker
    of the first stage raise once at that epoch.
    """
    common = dict(
        config=cfg, class_names=dataset.class_names, num_train=dataset.split_size("train"),
        class_counts=tuple(dataset.class_counts("train")), has_masks=dataset.has_masks,
        mlflow_uri=mlflow_uri, mlflow_run_id=mlflow_run_id,
    )
    first = stages[0]
    if "pretrain" in stages:
        spec = StageSpec("pretrain", fail_at_epoch=fail_at_epoch if first == "pretrain" else None, **common)
        init_checkpoint = run_stage(spec, dataset, storage, f"{name}-pretrain").checkpoint.path
        if on_pretrained:
            on_pretrained(init_checkpoint)
    if "finetune" not in stages:
        return StagesResult(init_checkpoint, None, float("nan"))
    if init_checkpoint is None:
        log("no pre-training checkpoint: fine-tuning starts from random weights (a supervised ViT from scratch)")
    spec = StageSpec("finetune", init_checkpoint=init_checkpoint, fail_at_epoch=fail_at_epoch if first == "finetune" else None, **common)
    result = run_stage(spec, dataset, storage, f"{name}-finetune", callbacks=finetune_callbacks)
    best_dir, best = best_checkpoint(result, cfg.checkpoint.metric)
    return StagesResult(init_checkpoint, best_dir, best)
