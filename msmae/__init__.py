"""MSMAE — medical supervised masked autoencoders, the method (torch + timm only).

Public API:
    sam_masking, random_masking, MaskSplit   masking (msmae.masking)
    attention_maps                           supervised attention maps (msmae.attention)
    crop_flip_maps                           move maps with the augmentation (msmae.geometry)
    build_pretrain_model, build_classifier,
    load_pretrained_encoder, PRESETS         models by preset name (msmae.models)
    AttentionTable                           per-image maps keyed by dataset index
    pretrain_step, finetune_step, evaluate,
    compute_attention_maps, draw_masks,
    refresh_maps                             step functions for any loop (msmae.engine)
    map_quality, MapQuality                  do the maps point at tissue? (msmae.map_quality)
    lesion_patches, lesion_scores,
    LesionScores, masking_lesion_shares      do the maps find the lesion? (msmae.lesion_metrics)
    source_maps, MAP_SOURCES, MapSource      where a map comes from: CLS attention, rollout,
                                             gradient-weighted attention, occlusion (msmae.map_sources)
    train_one_epoch, EpochPlan               one epoch of either stage (msmae.loop)
    StageTrainer, StageSchedule              the epoch skeleton any loop shares (msmae.loop)
    build_optimizer                          each stage's AdamW (msmae.optim)
    Stage, MaskingStrategy, STRATEGIES       the vocabulary: stage names and each stage's masking rules (msmae.loop)
    ClsLoss, CLS_LOSSES, cls_cross_entropy   the CLS term on logits or the released code's softmax first (msmae.losses)
    report_from_probs, RefreshedMaps,
    encode, encoder_of, autocast,
    patchify, unpatchify, preset_dict        what clients (pipelines, comparison) build on
    msmae.defaults                           the paper's hyper-parameters, declared once

This package never imports Ray or MLflow: it runs alone on a GPU box.
"""

from msmae import defaults
from msmae.attention import attention_maps, encoder_of
from msmae.engine import (
    MaskRatios,
    RefreshedMaps,
    autocast,
    compute_attention_maps,
    draw_masks,
    evaluate,
    finetune_step,
    predict_probs,
    pretrain_step,
    refresh_maps,
    report_from_probs,
)
from msmae.geometry import crop_flip_maps
from msmae.losses import CLS_LOSSES, ClsLoss, balanced_class_weights, cls_cross_entropy, patchify, unpatchify
from msmae.lesion_metrics import LesionScores, lesion_patches, lesion_scores, masking_lesion_shares
from msmae.map_quality import MapQuality, foreground_patches, map_quality
from msmae.map_sources import MAP_SOURCES, MapSource, source_maps
from msmae.loop import STRATEGIES, EpochOutcome, EpochPlan, EpochTotals, MaskingStrategy, Stage, StageSchedule, StageTrainer, train_one_epoch
from msmae.masking import MaskSplit, mask_counts, random_masking, sam_masking
from msmae.metrics import HEADLINE_METRICS, ClassificationReport, classification_report
from msmae.models import (
    PRESETS,
    MSMAEClassifier,
    MSMAEPretrainModel,
    ViTPreset,
    build_classifier,
    build_pretrain_model,
    encode,
    get_preset,
    load_pretrained_encoder,
    preset_dict,
)
from msmae.optim import build_optimizer, layer_decay_param_groups
from msmae.schedules import MaskingSchedule, cosine_lr, scaled_lr, set_lr
from msmae.table import AttentionTable

__version__ = "0.1.0"

__all__ = [
    "defaults",
    "CLS_LOSSES",
    "ClsLoss",
    "cls_cross_entropy",
    "HEADLINE_METRICS",
    "MAP_SOURCES",
    "LesionScores",
    "MapSource",
    "lesion_patches",
    "lesion_scores",
    "masking_lesion_shares",
    "source_maps",
    "STRATEGIES",
    "MaskingStrategy",
    "RefreshedMaps",
    "Stage",
    "autocast",
    "encode",
    "encoder_of",
    "patchify",
    "preset_dict",
    "report_from_probs",
    "unpatchify",
    "PRESETS",
    "AttentionTable",
    "ClassificationReport",
    "EpochOutcome",
    "EpochPlan",
    "EpochTotals",
    "MSMAEClassifier",
    "MSMAEPretrainModel",
    "MaskRatios",
    "MapQuality",
    "MaskSplit",
    "MaskingSchedule",
    "StageSchedule",
    "StageTrainer",
    "ViTPreset",
    "attention_maps",
    "balanced_class_weights",
    "build_classifier",
    "build_optimizer",
    "build_pretrain_model",
    "classification_report",
    "compute_attention_maps",
    "cosine_lr",
    "crop_flip_maps",
    "draw_masks",
    "evaluate",
    "finetune_step",
    "foreground_patches",
    "get_preset",
    "layer_decay_param_groups",
    "load_pretrained_encoder",
    "map_quality",
    "mask_counts",
    "predict_probs",
    "pretrain_step",
    "random_masking",
    "refresh_maps",
    "sam_masking",
    "scaled_lr",
    "set_lr",
    "train_one_epoch",
]
