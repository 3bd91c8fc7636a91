"""What runs inside each Ray Train worker: one MSMAE stage (pre-training or fine-tuning).

The loop is the paper's schedule around ``msmae``'s step functions. The one piece of
state beyond the model is the attention table: at the scheduled epochs every worker
computes maps for its share of the un-augmented training set, the shares are all-gathered,
and every worker ends up with the identical full table (keyed by the dataset's stable
``index``), which is saved in each checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import msmae
from msmae.engine import MaskRatios
from pipelines.config import RunConfig, validate_config

Stage = Literal["pretrain", "finetune"]
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs, picklable (the config travels as a plain dict)."""

    stage: Stage
    config: dict
    num_classes: int
    num_train: int
    class_names: list[str]
    init_checkpoint: str | None = None  # pre-training checkpoint dir for fine-tuning
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    fail_at_epoch: int | None = None  # fault injection for tests: a worker raises once, at this epoch

    def run_config(self) -> RunConfig:
        return validate_config(self.config)


def _gather(obj: Any) -> list[Any]:
    """All-gather a picklable object across the worker group (identity with one worker)."""
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def refresh_table(model: torch.nn.Module, table: msmae.AttentionTable, shard, batch_size: int, device, epoch: int) -> int:
    """Recompute maps from this worker's share of the un-augmented images, then all-gather."""
    batches = (
        (b["image"], b["index"])
        for b in shard.iter_torch_batches(batch_size=batch_size, device=device)
    )
    try:
        index, maps = msmae.compute_attention_maps(model, batches)
    except ValueError:  # this worker's share is empty (tiny datasets, many workers)
        index, maps = torch.empty(0, dtype=torch.long), torch.empty(0, table.maps.shape[1])
    parts = _gather((index, maps.half()))
    table.update(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).float(), epoch=epoch)
    return sum(len(p[0]) for p in parts)


def table_replicas_equal(table: msmae.AttentionTable) -> bool:
    """Do all workers hold the identical table? (a digest per worker, compared on every worker)"""
    digest = hashlib.sha256(table.maps.cpu().numpy().tobytes()).hexdigest()
    return len(set(_gather(digest))) == 1


def validate(model: torch.nn.Module, shard, batch_size: int, device, num_classes: int) -> msmae.ClassificationReport:
    """Full-image evaluation of this worker's share, all-gathered into one global report."""
    probs, labels = [], []
    for b in shard.iter_torch_batches(batch_size=batch_size, device=device):
        probs.append(msmae.predict_probs(model, b["image"]).cpu())
        labels.append(b["label"].cpu())
    local = (torch.cat(probs) if probs else torch.empty(0, num_classes), torch.cat(labels) if labels else torch.empty(0, dtype=torch.long))
    parts = _gather(local)
    all_probs, all_labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return msmae.engine.report_from_probs(all_probs, all_labels, num_classes)


class _PretrainHeadView(torch.nn.Module):
    """The pre-training model's encoder + CLS classifier as a classifier on whole images,
    so pre-training reports validation metrics of its supervised head."""

    def __init__(self, model: msmae.MSMAEPretrainModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.forward_head(msmae.models.encode(self.model.encoder, images))


def build_stage_model(spec: StageSpec, cfg: RunConfig) -> torch.nn.Module:
    preset = msmae.get_preset(cfg.model.preset, cfg.data.img_size, cfg.model.patch_size)
    if spec.stage == "pretrain":
        return msmae.build_pretrain_model(preset, spec.num_classes)
    model = msmae.build_classifier(preset, spec.num_classes, drop_path_rate=cfg.finetune.drop_path)
    if spec.init_checkpoint:
        state = torch.load(Path(spec.init_checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
        msmae.load_pretrained_encoder(model, state["model"])
    return model


def build_optimizer(spec: StageSpec, cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available()
    if spec.stage == "pretrain":
        from timm.optim import param_groups_weight_decay

        groups = param_groups_weight_decay(model, cfg.pretrain.weight_decay)
        return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused)
    groups = msmae.layer_decay_param_groups(model, cfg.finetune.weight_decay, cfg.finetune.layer_decay)
    return torch.optim.AdamW(groups, fused=fused)


def save_checkpoint(state: dict, metrics: dict, spec: StageSpec) -> ray.train.Checkpoint:
    directory = Path(tempfile.mkdtemp(prefix="msmae-ckpt-"))
    torch.save(state, directory / STATE_FILE)
    (directory / "meta.json").write_text(json.dumps({"stage": spec.stage, "metrics": metrics, "class_names": spec.class_names, "config": spec.config}, default=str))
    return ray.train.Checkpoint.from_directory(str(directory))


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every ``ray.train.report`` at INFO (the whole metrics dict, ~1 KB per epoch
    and worker) under a logger named after its source file, which ``LoggingConfig``'s level
    (applied to ``ray.train.*`` loggers only) misses; the epoch lines are what a user reads."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay, nothing else changes
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(loop_config: dict) -> None:
    """``train_loop_per_worker`` of the TorchTrainer for one stage."""
    _quiet_report_lines()
    spec: StageSpec = loop_config["spec"]
    cfg = spec.run_config()
    stage_cfg = cfg.pretrain if spec.stage == "pretrain" else cfg.finetune
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed + rank)

    model = build_stage_model(spec, cfg)
    preset = model.preset
    table = msmae.AttentionTable(spec.num_train, preset.grid, device=device)
    optimizer_model = model
    start_epoch, best = 0, None
    checkpoint = ray.train.get_checkpoint()
    resume_state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume_state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        model.load_state_dict(resume_state["model"])
        table = msmae.AttentionTable.from_state_dict(resume_state["table"], device)
        start_epoch, best = resume_state["epoch"] + 1, resume_state.get("best")
    model = ray.train.torch.prepare_model(model)  # DDP across the worker group
    raw = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(spec, cfg, optimizer_model)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])

    per_worker_batch = max(1, stage_cfg.batch_size // world)
    steps_per_epoch = max(1, spec.num_train // (per_worker_batch * world))
    lr_peak = msmae.scaled_lr(stage_cfg.blr, per_worker_batch * world)
    masking = stage_cfg.masking
    schedule = msmae.MaskingSchedule(masking.sam_start, masking.refresh_every)
    use_sam = spec.stage == "pretrain" or cfg.finetune.sam
    generator = torch.Generator(device=device).manual_seed(cfg.data.seed * 1000 + rank)
    train_shard = ray.train.get_dataset_shard("train")
    plain_shard = ray.train.get_dataset_shard("train_plain")
    val_shard = ray.train.get_dataset_shard("val")
    eval_model = _PretrainHeadView(raw) if spec.stage == "pretrain" else raw
    # How many Ray nodes the worker group spans (the multi-node path is tested on this).
    worker_nodes = len(set(_gather(ray.get_runtime_context().get_node_id())))
    logger = _MlflowLogger(spec) if rank == 0 else None

    plan = msmae.EpochPlan(
        spec.stage, "random", MaskRatios(masking.mask_ratio, masking.throw_ratio, getattr(stage_cfg, "random_mask_ratio", 0.75)),
        align_maps=masking.align_maps, cls_weight=getattr(stage_cfg, "cls_weight", 0.1),
        norm_pix_loss=getattr(stage_cfg, "norm_pix_loss", False), label_smoothing=getattr(stage_cfg, "label_smoothing", 0.1),
    )

    def lr_at(fractional_epoch: float) -> float:
        return msmae.cosine_lr(fractional_epoch, lr_peak, stage_cfg.min_lr, stage_cfg.warmup_epochs, stage_cfg.epochs)

    for epoch in range(start_epoch, stage_cfg.epochs):
        epoch_start = time.perf_counter()
        if spec.fail_at_epoch == epoch and rank == world - 1 and not checkpoint:
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault-injection test)")
        refreshed, replicas_equal = 0, float("nan")
        if use_sam and schedule.refresh_due(epoch):
            refreshed = refresh_table(raw, table, plain_shard, per_worker_batch, device, epoch)
            replicas_equal = float(table_replicas_equal(table))
        phase = schedule.phase(epoch) if use_sam else "random"
        train_start = time.perf_counter()
        batches = train_shard.iter_torch_batches(batch_size=per_worker_batch, device=device, drop_last=True)
        totals = msmae.train_one_epoch(model, optimizer, batches, replace(plan, phase=phase), table, lr_at, epoch, steps_per_epoch, generator)
        seen = totals.seen
        train_seconds = time.perf_counter() - train_start
        report = validate(eval_model, val_shard, per_worker_batch, device, spec.num_classes)
        images_per_s = sum(_gather(seen)) / max(train_seconds, 1e-9)
        metrics = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in totals.means().items()},
            **{f"val_{k}": v for k, v in report.scalars().items()},
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": images_per_s,
            "epoch_seconds": time.perf_counter() - epoch_start,
            "maps_refreshed": refreshed,
            "attention_table_replicas_equal": replicas_equal,
            "masking_phase_sam": float(phase == "sam"),
            "worker_nodes": worker_nodes,
        }
        score = metrics.get(cfg.checkpoint.metric)
        improved = score is not None and (best is None or score > best)
        if improved:
            best = score
        metrics["best_" + cfg.checkpoint.metric] = best if best is not None else float("nan")
        last_epoch = epoch == stage_cfg.epochs - 1
        ckpt = None
        if rank == 0 and (last_epoch or (epoch + 1) % cfg.checkpoint.every == 0):
            state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(), "table": table.state_dict(), "epoch": epoch, "best": best, "preset": asdict(preset), "num_classes": spec.num_classes, "class_names": spec.class_names}
            ckpt = save_checkpoint(state, metrics, spec)
        if logger:
            logger.log(spec.stage, metrics, report, epoch)
            _print_progress(spec.stage, epoch, stage_cfg.epochs, metrics, cfg.checkpoint.metric)
        ray.train.report(metrics, checkpoint=ckpt)


def _print_progress(stage: str, epoch: int, epochs: int, m: dict, metric: str) -> None:
    eta = m["epoch_seconds"] * (epochs - epoch - 1)
    print(
        f"[{stage}] epoch {epoch + 1}/{epochs}  loss {m['train_loss']:.4f}  val acc {m['val_accuracy']:.3f} "
        f"f1 {m['val_macro_f1']:.3f}  {m['images_per_s']:.0f} img/s  ETA {eta:.0f}s",
        # Ray Train patches print() in its workers to copy each line to both stdout and stderr,
        # and the driver shows both: the real stdout gets the line once.
        file=sys.__stdout__, flush=True,
    )


class _MlflowLogger:
    """Per-epoch metrics from rank 0 into the driver's MLflow run (no-op without one)."""

    def __init__(self, spec: StageSpec) -> None:
        self.client = None
        self.run_id = spec.mlflow_run_id
        if spec.mlflow_uri and spec.mlflow_run_id:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=spec.mlflow_uri)

    def log(self, stage: str, metrics: dict, report: msmae.ClassificationReport, epoch: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(f"{stage}/{k}", float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
        self.client.log_batch(self.run_id, metrics=values)
