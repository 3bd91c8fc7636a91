"""What runs inside each Ray Train worker: one MSMAE stage (pre-training or fine-tuning).

The epochs are ``msmae.StageTrainer``'s — the same skeleton the one-process comparison
runner uses. What is distributed lives here: the attention-table refresh (every worker
computes maps for its share of the un-augmented training set, the shares are all-gathered,
and every worker ends up with the identical full table, keyed by the dataset's stable
``index``), validation gathered across workers, checkpoints, and rank 0's reporting.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import msmae
from pipelines import checkpoint
from pipelines.config import RunConfig, ScalingConfig
from pipelines.data.streams import with_float_images
from pipelines.train.metric_names import named_scalars

Stage = msmae.Stage  # the stage names are the method's (one vocabulary)
MAP_QUALITY_KEYS = tuple(msmae.MapQuality(0, 0, 0, 0, 0).metrics())
# where the refreshed maps lie against the validation images' lesion masks (datasets ingested with --masks)
LESION_KEYS = (*msmae.LesionScores(0, 0, 0, 0, 0, 0, 0).metrics(), "lesion_seen_share", "lesion_masked_share")


@dataclass(frozen=True)
class StageSpec:
    """Everything a worker needs; picklable, the validated config included as itself."""

    stage: Stage
    config: RunConfig
    class_names: list[str]
    num_train: int
    class_counts: tuple[int, ...] = ()  # training images per class, in class order (for balanced class weights)
    has_masks: bool = False  # the dataset carries lesion masks: score the maps against them at every refresh
    init_checkpoint: str | None = None  # pre-training checkpoint dir for fine-tuning
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    fail_at_epoch: int | None = None  # fault injection for tests: a worker raises once, at this epoch

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _gather(obj: Any) -> list[Any]:
    """All-gather a picklable object across the worker group (identity with one worker)."""
    if not dist.is_available() or not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def refresh_table(
    model: torch.nn.Module, table: msmae.AttentionTable, shard, batch_size: int, device, epoch: int, source: str = "cls_attention",
) -> tuple[int, msmae.MapQuality]:
    """Recompute maps (from ``source``, ``msmae.MAP_SOURCES``) from this worker's share of the
    un-augmented images, then all-gather.

    Returns how many images were refreshed and where the new maps' mass lies (tissue or
    background), measured over the whole table."""
    batches = (
        (b["image"], b["index"], b["label"])  # the label: the class grad_attention and occlusion explain
        for b in shard.iter_torch_batches(batch_size=batch_size, device=device)
    )
    try:
        mine = msmae.refresh_maps(model, batches, source=source)
    except ValueError:  # this worker's share is empty (tiny datasets, many workers)
        size = table.maps.shape[1]
        mine = msmae.RefreshedMaps(torch.empty(0, dtype=torch.long), torch.empty(0, size), torch.empty(0, size, dtype=torch.bool))
    parts = _gather((mine.index, mine.maps.half(), mine.foreground))
    index, maps, foreground = (torch.cat([p[k] for p in parts]) for k in range(3))
    table.update(index, maps.float(), epoch=epoch)
    return len(index), msmae.map_quality(maps.float(), foreground)


def lesion_metrics(
    model: torch.nn.Module, shard, batch_size: int, device, source: str, ratios: msmae.MaskRatios, generator: torch.Generator,
) -> dict[str, float]:
    """Do this refresh's maps find the lesion? Maps from ``source`` on the validation images that
    have a lesion mask, scored against it (``msmae.lesion_metrics``), plus the lesion share of the
    patches a SAM draw by these maps would show the encoder and would mask. {} when the dataset has
    no masks among the validation images. Every worker scores its share; the shares are all-gathered
    and scored once (so every worker calls this, an empty share included)."""
    patch_size = model.preset.patch_size
    maps, lesion = [], []
    for b in shard.iter_torch_batches(batch_size=batch_size, device=device):
        has = b["has_mask"].bool()
        if has.any():
            maps.append(msmae.source_maps(model, b["image"][has], source, b["label"][has]).float().cpu())
            lesion.append(msmae.lesion_patches(b["mask"][has], patch_size).cpu())
    parts = _gather((torch.cat(maps) if maps else None, torch.cat(lesion) if lesion else None))
    maps = [m for m, _ in parts if m is not None]
    if not maps:
        return {}
    maps, lesion = torch.cat(maps), torch.cat([l for _, l in parts if l is not None])
    scores = msmae.lesion_scores(maps, lesion).metrics()
    split = msmae.sam_masking(maps, ratios.mask, ratios.throw, generator=generator)
    return {**scores, **msmae.masking_lesion_shares(split.kept, split.masked, lesion)}


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
    return msmae.report_from_probs(all_probs, all_labels, num_classes)


class _PretrainHeadView(torch.nn.Module):
    """The pre-training model's encoder + CLS classifier as a classifier on whole images,
    so pre-training reports validation metrics of its supervised head."""

    def __init__(self, model: msmae.MSMAEPretrainModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.forward_head(msmae.encode(self.model.encoder, images))


def build_stage_model(spec: StageSpec) -> torch.nn.Module:
    cfg = spec.config
    if spec.stage == "pretrain":
        return msmae.build_pretrain_model(cfg.preset(), spec.num_classes)
    model = msmae.build_classifier(cfg.preset(), spec.num_classes, drop_path_rate=cfg.finetune.drop_path)
    if spec.init_checkpoint:
        checkpoint.load_encoder_into(model, spec.init_checkpoint)
    return model


def epoch_plan(spec: StageSpec) -> msmae.EpochPlan:
    """The stage's training rule from the config (the phase is set per epoch by the schedule)."""
    if spec.stage == "pretrain":
        p = spec.config.pretrain
        ratios = msmae.MaskRatios(p.masking.mask_ratio, p.masking.throw_ratio, p.random_mask_ratio)
        return msmae.EpochPlan(
            "pretrain", "random", ratios, strategy=p.masking.strategy, align_maps=p.masking.align_maps,
            cls_weight=p.cls_weight, norm_pix_loss=p.norm_pix_loss, cls_loss=p.cls_loss, class_weights=class_weights(spec, p.class_weights),
        )
    f = spec.config.finetune
    ratios = msmae.MaskRatios(f.masking.mask_ratio, f.masking.throw_ratio)
    return msmae.EpochPlan(
        "finetune", "random", ratios, strategy=f.masking.strategy, align_maps=f.masking.align_maps, label_smoothing=f.label_smoothing,
        class_weights=class_weights(spec, f.class_weights),
    )


def class_weights(spec: StageSpec, rule: str) -> torch.Tensor | None:
    """The stage's cross-entropy class weights (``rule`` "balanced": inverse training frequency)."""
    if rule == "none":
        return None
    if len(spec.class_counts) != spec.num_classes:
        raise ValueError(f"class_weights={rule!r} needs the training split's class counts; the stage was given {spec.class_counts}")
    return msmae.balanced_class_weights(list(spec.class_counts))


def build_optimizer(spec: StageSpec, model: torch.nn.Module) -> torch.optim.Optimizer:
    fused = torch.cuda.is_available()
    if spec.stage == "pretrain":
        return msmae.build_optimizer(model, "pretrain", spec.config.pretrain.weight_decay, fused=fused)
    f = spec.config.finetune
    return msmae.build_optimizer(model, "finetune", f.weight_decay, f.layer_decay, fused=fused)


def stage_schedule(spec: StageSpec, global_batch: int) -> msmae.StageSchedule:
    """Per-step lr (linear scaling by the global batch) and when SAM runs; all-token fine-tuning never does."""
    stage_cfg = spec.config.pretrain if spec.stage == "pretrain" else spec.config.finetune
    m = stage_cfg.masking
    masking = msmae.MaskingSchedule.until_fraction(m.sam_start, m.refresh_every, m.all_tokens_from, stage_cfg.epochs) if m.strategy != "all" else None
    return msmae.StageSchedule(stage_cfg.epochs, msmae.scaled_lr(stage_cfg.blr, global_batch), stage_cfg.min_lr, stage_cfg.warmup_epochs, masking)


def compile_for_training(model: torch.nn.Module, scaling: ScalingConfig, backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` the training model when ``scaling.torch_compile`` says so (null: only with GPUs).

    ``dynamic=None``: the first shapes compile static; a second batch size (a last partial batch)
    or token count (the switch from random masking to SAM) recompiles once with that dimension
    dynamic, not once per shape. The training stream drops its partial batch anyway, and
    evaluation runs the uncompiled module, whose batches vary."""
    enabled = scaling.torch_compile if scaling.torch_compile is not None else scaling.use_gpu
    return torch.compile(model, backend=backend, dynamic=None) if enabled else model


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
    cfg = spec.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed + rank)

    model = build_stage_model(spec)
    table = msmae.AttentionTable(spec.num_train, model.preset.grid, device=device)
    start_epoch, best, resume_state = 0, None, None
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            resume_state = checkpoint.read_state(d)
        model.load_state_dict(resume_state["model"])
        table = msmae.AttentionTable.from_state_dict(resume_state["table"], device)
        start_epoch, best = resume_state["epoch"] + 1, resume_state.get("best")
    raw = model
    model = ray.train.torch.prepare_model(model)  # DDP across the worker group; moves raw to the device
    model = compile_for_training(model, cfg.scaling)  # the DDP-wrapped model, as torch recommends
    stage_cfg = cfg.pretrain if spec.stage == "pretrain" else cfg.finetune
    optimizer = build_optimizer(spec, raw)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])

    per_worker_batch = max(1, stage_cfg.batch_size // world)
    steps_per_epoch = max(1, spec.num_train // (per_worker_batch * world))
    generator = torch.Generator(device=device).manual_seed(cfg.data.seed * 1000 + rank)
    trainer = msmae.StageTrainer(model, optimizer, epoch_plan(spec), stage_schedule(spec, per_worker_batch * world), table, generator)
    train_shard = ray.train.get_dataset_shard("train")
    plain_shard = ray.train.get_dataset_shard("train_plain")
    val_shard = ray.train.get_dataset_shard("val")
    eval_model = _PretrainHeadView(raw) if spec.stage == "pretrain" else raw
    # How many Ray nodes the worker group spans (the multi-node path is tested on this).
    worker_nodes = len(set(_gather(ray.get_runtime_context().get_node_id())))
    logger = None
    if rank == 0 and spec.mlflow_uri and spec.mlflow_run_id:
        from pipelines.tracking import EpochLogger

        logger = EpochLogger(spec.mlflow_uri, spec.mlflow_run_id, spec.stage, say=lambda line: print(line, file=sys.__stdout__, flush=True))
    refresh_metrics: dict[str, float] = {}

    source = stage_cfg.masking.map_source
    lesion_generator = torch.Generator().manual_seed(cfg.data.seed)  # the same draw on every worker

    def refresh(epoch: int) -> int:
        refreshed, quality = refresh_table(raw, table, plain_shard, per_worker_batch, device, epoch, source)
        refresh_metrics.update(quality.metrics(), attention_table_replicas_equal=float(table_replicas_equal(table)))
        if spec.has_masks:
            refresh_metrics.update(lesion_metrics(raw, val_shard, per_worker_batch, device, source, trainer.plan.ratios, lesion_generator))
        return refreshed

    epoch_times: list[float] = []  # this process's epochs, for the ETA on the epoch line
    for epoch in range(start_epoch, stage_cfg.epochs):
        epoch_start = time.perf_counter()
        if spec.fail_at_epoch == epoch and rank == world - 1 and not restored:
            raise RuntimeError(f"injected worker failure at epoch {epoch} (fault-injection test)")
        refresh_metrics.clear()
        # uint8 images (GPU workers, pipelines/train/launcher.py) normalised here, on the device; inside the timed wait for the batch
        batches = map(with_float_images, train_shard.iter_torch_batches(batch_size=per_worker_batch, device=device, drop_last=True))
        outcome = trainer.run_epoch(epoch, batches, steps_per_epoch, refresh)
        report = validate(eval_model, val_shard, per_worker_batch, device, spec.num_classes)
        seen_and_wait = _gather((outcome.totals.seen, outcome.data_wait_fraction))
        images_per_s = sum(seen for seen, _ in seen_and_wait) / max(outcome.train_seconds, 1e-9)
        metrics = {
            "epoch": epoch,
            **{f"train_{k}": v for k, v in outcome.totals.means().items()},
            **named_scalars(report, spec.class_names, "val_"),  # per-class AUC under the class's name
            "lr": optimizer.param_groups[-1]["lr"],
            "images_per_s": images_per_s,
            # time the steps waited for their batches / training time, averaged over the workers
            "data_wait_fraction": sum(wait for _, wait in seen_and_wait) / len(seen_and_wait),
            "epoch_seconds": time.perf_counter() - epoch_start,
            "maps_refreshed": outcome.maps_refreshed,
            "attention_table_replicas_equal": refresh_metrics.get("attention_table_replicas_equal", float("nan")),
            **{k: refresh_metrics.get(k, float("nan")) for k in MAP_QUALITY_KEYS},  # measured at refresh epochs only
            **{k: refresh_metrics.get(k, float("nan")) for k in LESION_KEYS},  # refresh epochs of datasets with masks only
            "masking_phase_sam": float(outcome.phase == "sam"),
            "worker_nodes": worker_nodes,
        }
        score = metrics.get(cfg.checkpoint.metric)
        if score is not None and (best is None or score > best):
            best = score
        metrics["best_" + cfg.checkpoint.metric] = best if best is not None else float("nan")
        ckpt, local = None, None
        if rank == 0 and (epoch == stage_cfg.epochs - 1 or (epoch + 1) % cfg.checkpoint.every == 0):
            local = tempfile.mkdtemp(prefix="msmae-ckpt-")
            checkpoint.write_checkpoint(
                local, stage=spec.stage, model_state=raw.state_dict(),
                optimizer_state=optimizer.state_dict(), table=table, epoch=epoch, best=best, preset=raw.preset,
                class_names=spec.class_names, metrics=metrics, config=cfg.public_dump(),
            )
            ckpt = ray.train.Checkpoint.from_directory(local)
        if logger:
            logger.log(metrics, epoch)
        epoch_times.append(metrics["epoch_seconds"])
        if rank == 0:
            _print_progress(spec.stage, epoch, stage_cfg.epochs, metrics, sum(epoch_times) / len(epoch_times))
        try:
            ray.train.report(metrics, checkpoint=ckpt)  # SYNC upload: the copy in storage is complete when this returns
        finally:
            if local is not None:  # Ray leaves the local copy; a 400-epoch run would fill the node's disk
                shutil.rmtree(local, ignore_errors=True)


def _print_progress(stage: str, epoch: int, epochs: int, m: dict, mean_epoch_s: float) -> None:
    """The epoch line; its ETA is the stage's remaining epochs at the mean epoch time so far (``mm:ss``);
    on a dataset with lesion masks, the refresh's map-on-lesion scores follow."""
    from pipelines.progress import format_duration

    eta = format_duration(mean_epoch_s * (epochs - epoch - 1))
    lesion = m.get("lesion_mass", float("nan"))
    on_lesion = (f"  maps on lesion: mass {lesion:.2f} (share {m['lesion_share']:.2f}, lift {m['lesion_lift']:.2f}) "
                 f"pointing {m['lesion_pointing']:.2f} AUROC {m['lesion_auroc']:.2f} seen {m['lesion_seen_share']:.2f}"
                 if lesion == lesion else "")
    print(
        f"[{stage}] epoch {epoch + 1}/{epochs}  loss {m['train_loss']:.4f}  val acc {m['val_accuracy']:.3f} "
        f"f1 {m['val_macro_f1']:.3f}  {m['images_per_s']:.0f} img/s  data wait {m['data_wait_fraction']:.0%}  ETA {eta}{on_lesion}",
        # Ray Train patches print() in its workers to copy each line to both stdout and stderr,
        # and the driver shows both: the real stdout gets the line once.
        file=sys.__stdout__, flush=True,
    )
