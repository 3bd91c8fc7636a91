"""What runs inside each Ray Train worker of the segmentation stage (``msmae segment``).

The encoder (MSMAE/MAE pre-trained, or random) + a SETR-PUP head (``msmae.segmentation``),
trained with BCE + soft Dice on the training stream's images and lesion masks — the masks went
through the same crop, flip and resize as their images (``pipelines.data.streams``). Only images
that have a mask contribute to the loss and the metrics (a dataset can hold images whose mask was
quarantined at ingest); how many did is reported. Each epoch: validation Dice / IoU per image,
gathered across workers; rank 0 checkpoints (the project's one weights format,
``pipelines.checkpoint``) and logs to MLflow. Ray keeps the best checkpoints by ``segment.metric``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import ray.train
import ray.train.torch
import torch

import msmae
from msmae.segmentation import MSMAESegmenter, build_segmenter, dice_bce_loss, dice_iou, load_encoder_for_segmentation
from pipelines import checkpoint
from pipelines.config import RunConfig, SegmentConfig
from pipelines.data.streams import with_float_images
from pipelines.train.worker import _gather, _quiet_report_lines, compile_for_training

STAGE = "segment"  # the MLflow metric prefix (segment/val_dice) and the checkpoint's stage


@dataclass(frozen=True)
class SegmentSpec:
    """Everything a segmentation worker needs; picklable."""

    config: RunConfig
    num_train: int
    init_checkpoint: str | None = None  # a pre-training checkpoint folder (MSMAE or MAE); None: encoder from scratch
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None


def build_segment_model(cfg: RunConfig, init_checkpoint: str | None) -> MSMAESegmenter:
    """The segmenter at the run's preset and size, its encoder from ``init_checkpoint``'s pre-training when given."""
    model = build_segmenter(cfg.preset(), decoder_width=cfg.segment.decoder_width)
    if init_checkpoint:
        load_encoder_for_segmentation(model, checkpoint.read_state(init_checkpoint)["model"])
    return model


def build_segment_optimizer(model: MSMAESegmenter, seg: SegmentConfig) -> torch.optim.AdamW:
    """AdamW, no weight decay on biases, norms, position embedding and CLS token; the encoder's groups carry
    ``lr_scale = encoder_lr_scale`` (``msmae.set_lr`` honours it), so a pre-trained encoder can move slower than the new head."""
    from timm.optim import param_groups_weight_decay

    groups = []
    for part, scale in ((model.encoder, seg.encoder_lr_scale), (model.decoder, 1.0)):
        no_decay = getattr(part, "no_weight_decay", lambda: set())()
        for group in param_groups_weight_decay(part, seg.weight_decay, no_weight_decay_list=no_decay):
            groups.append({**group, "lr_scale": scale})
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available())


def segment_step(model: torch.nn.Module, batch: dict, seg: SegmentConfig) -> tuple[torch.Tensor, int]:
    """The loss of one batch over its images that have a mask, and how many those were.

    A batch with none still runs a forward pass and returns a zero loss built from the logits, so every
    DDP worker takes part in every gradient all-reduce."""
    logits = model(batch["image"])  # [B, 1, S, S]
    has = batch["has_mask"].bool()
    if not has.any():
        return logits.sum() * 0.0, 0
    target = batch["mask"][has].unsqueeze(1)  # [b, 1, S, S], 0/1
    return dice_bce_loss(logits[has], target, dice_weight=seg.dice_weight), int(has.sum())


@torch.no_grad()
def validate_segmentation(model: torch.nn.Module, shard, batch_size: int, device, seg: SegmentConfig) -> dict[str, float]:
    """Per-image Dice and IoU (and the loss) on this worker's share of the validation images that have a
    mask, at the training size, all-gathered: the means over the whole split."""
    model.eval()
    dice, iou, losses = [], [], []
    for b in shard.iter_torch_batches(batch_size=batch_size, device=device):
        has = b["has_mask"].bool()
        if not has.any():
            continue
        logits = model(b["image"][has])
        target = b["mask"][has].unsqueeze(1)
        losses.append(float(dice_bce_loss(logits, target, dice_weight=seg.dice_weight)) * int(has.sum()))
        d, i = dice_iou(torch.sigmoid(logits) > seg.threshold, target.bool())
        dice.append(d.cpu())
        iou.append(i.cpu())
    model.train()
    parts = _gather((torch.cat(dice) if dice else torch.empty(0, dtype=torch.float64),
                     torch.cat(iou) if iou else torch.empty(0, dtype=torch.float64), sum(losses)))
    all_dice, all_iou = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    n = len(all_dice)
    if not n:
        return {"val_dice": float("nan"), "val_iou": float("nan"), "val_loss": float("nan"), "val_images": 0}
    return {"val_dice": float(all_dice.mean()), "val_iou": float(all_iou.mean()), "val_loss": sum(p[2] for p in parts) / n, "val_images": n}


def segment_loop(loop_config: dict) -> None:
    """``train_loop_per_worker`` of the segmentation TorchTrainer."""
    _quiet_report_lines()
    spec: SegmentSpec = loop_config["spec"]
    cfg, seg = spec.config, spec.config.segment
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.data.seed + rank)

    restored = ray.train.get_checkpoint()
    model = build_segment_model(cfg, None if restored else spec.init_checkpoint)
    start_epoch, best, resume_state = 0, None, None
    if restored:
        with restored.as_directory() as d:
            resume_state = checkpoint.read_state(d)
        model.load_state_dict(resume_state["model"])
        start_epoch, best = resume_state["epoch"] + 1, resume_state.get("best")
    raw = model
    model = ray.train.torch.prepare_model(model)
    model = compile_for_training(model, cfg.scaling)
    optimizer = build_segment_optimizer(raw, seg)
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])

    per_worker_batch = max(1, seg.batch_size // world)
    steps_per_epoch = max(1, spec.num_train // (per_worker_batch * world))
    base_lr = msmae.scaled_lr(seg.blr, per_worker_batch * world)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    logger = None
    if rank == 0 and spec.mlflow_uri and spec.mlflow_run_id:
        from pipelines.tracking import EpochLogger

        logger = EpochLogger(spec.mlflow_uri, spec.mlflow_run_id, STAGE, say=lambda line: print(line, file=sys.__stdout__, flush=True))

    model.train()
    for epoch in range(start_epoch, seg.epochs):
        epoch_start = time.perf_counter()
        loss_sum, with_mask, seen = 0.0, 0, 0
        batches = map(with_float_images, train_shard.iter_torch_batches(batch_size=per_worker_batch, device=device, drop_last=True))
        for step, batch in enumerate(batches):
            if step >= steps_per_epoch:
                break
            msmae.set_lr(optimizer, msmae.cosine_lr(epoch + step / steps_per_epoch, base_lr, seg.min_lr, seg.warmup_epochs, seg.epochs))
            loss, n = segment_step(model, batch, seg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, with_mask, seen = loss_sum + float(loss.detach()) * n, with_mask + n, seen + len(batch["image"])
        train_seconds = time.perf_counter() - epoch_start
        val = validate_segmentation(raw, val_shard, per_worker_batch, device, seg)
        totals = _gather((loss_sum, with_mask, seen))
        trained = sum(t[1] for t in totals)
        metrics = {
            "epoch": epoch,
            "train_loss": sum(t[0] for t in totals) / trained if trained else float("nan"),
            "train_images_with_mask": trained,
            "images_per_s": sum(t[2] for t in totals) / max(train_seconds, 1e-9),
            "lr": optimizer.param_groups[-1]["lr"],
            **val,
            "epoch_seconds": time.perf_counter() - epoch_start,
        }
        score = metrics[seg.metric]
        if score == score and (best is None or score > best):
            best = score
        metrics["best_" + seg.metric] = best if best is not None else float("nan")
        ckpt, local = None, None
        if rank == 0 and (epoch == seg.epochs - 1 or (epoch + 1) % cfg.checkpoint.every == 0):
            local = tempfile.mkdtemp(prefix="msmae-ckpt-")
            checkpoint.write_checkpoint(
                local, stage=STAGE, model_state=raw.state_dict(), optimizer_state=optimizer.state_dict(), table=None, epoch=epoch,
                best=best, preset=raw.preset, class_names=checkpoint.SEGMENT_CLASSES, metrics=metrics, config=cfg.public_dump(),
                task=checkpoint.SEGMENTATION, decoder_width=raw.decoder.classify.in_channels,
            )
            ckpt = ray.train.Checkpoint.from_directory(local)
        if logger:
            logger.log(metrics, epoch)
        if rank == 0:
            print(f"[segment] epoch {epoch + 1}/{seg.epochs}  loss {metrics['train_loss']:.4f}  val dice {metrics['val_dice']:.3f} "
                  f"iou {metrics['val_iou']:.3f} ({metrics['val_images']} images)  {metrics['images_per_s']:.0f} img/s",
                  file=sys.__stdout__, flush=True)
        try:
            ray.train.report(metrics, checkpoint=ckpt)
        finally:
            if local is not None:
                shutil.rmtree(local, ignore_errors=True)
