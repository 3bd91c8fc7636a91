"""Train and test one method end to end in one process, on data held on the device.

For a comparison on a single GPU box that has torch and timm but no Ray or MLflow. The
dataset comes from a bundle (``comparison.bundle``), is decoded once onto the device, and
augmented there (``comparison.augment``); every epoch is ``msmae.StageTrainer.run_epoch``,
the same epoch skeleton the Ray workers run, with the same optimisers
(``msmae.build_optimizer``), learning-rate schedule, masking schedule and attention-table
refreshes as ``pipelines/train/worker.py``.
Pre-trainings are kept, resumed and snapshotted on disk by ``comparison.pretrain_store``.

Methods (``METHODS``), each on its own recipe where its authors' differs (``Method.adapt``):
    supervised            ViT from random init on all tokens, no pre-training, no layer decay
    supervised_eqflops    the same at the training FLOPs of msmae_ft_all (epochs from comparison.flops)
    resnet18              timm ResNet-18 from random init, supervised, the supervised ViT's epochs
    mae                   MAE pre-training on MAE's own settings (random 75 %, no CLS loss,
                          norm_pix_loss, 5 % warm-up) + all-token fine-tuning
    mae_cls               random 75 % masking throughout + the CLS term (control: no SAM)
    msmae                 MSMAE pre-training (random warm-up, then SAM by attention) + SAM fine-tuning
    msmae_frozen_maps     as msmae, but fine-tuning keeps the pre-training's last maps (no refresh)
    msmae_ft_all          MSMAE pre-training (attention rule) + all-token fine-tuning
    msmae_uniform_ft_all  MSMAE pre-training with the uniform rule (CLS term kept) + all-token fine-tuning
    msmae_released        the released code: uniform weights in both stages, softmax before the CLS cross-entropy

attention (msmae_ft_all) vs uniform (msmae_uniform_ft_all) vs random (mae_cls) differ in the
pre-training masking rule only: CLS term, loss, recipe and fine-tuning are the same.

Protocol: validate on whole images after every fine-tuning epoch, keep the state with the
best validation macro-F1, evaluate it once on the test split; the selected state's per-image
validation and test predictions go into the record (``comparison.stats`` pairs them).
A learning rate per method comes from a grid chosen on validation (``blr`` of ``run_method``,
``Method.tuned_lr``; the grid loop is ``benchmarks/compare.py``'s).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Literal

import torch

import msmae
from comparison import flops as flops_mod
from comparison.augment import TrainBatches, eval_batches, resize_whole
from comparison.bundle import Bundle, decode_all
from comparison.pretrain_store import (
    Checkpointing, PretrainCache, StageResult, restore_training_state, save_training_state,
)
from msmae import defaults
from msmae import ClsLoss, MaskingStrategy, MaskRatios, evaluate, report_from_probs

PretrainKind = Literal["none", "mae", "msmae"]
Arch = Literal["vit", "resnet18"]


@dataclass(frozen=True)
class Method:
    """What a compared method changes; everything else is the shared ``Recipe``.

    ``finetune`` is the fine-tuning masking strategy (``msmae.loop.MaskingStrategy``: the
    paper's attention rule, the released code's uniform draw, or all tokens);
    ``pretrain_strategy`` the same choice for MSMAE pre-training's SAM phase.
    ``cls_term``: pre-training adds λ · CLS cross-entropy (None: MSMAE yes, MAE no), computed
    on logits or, as the released code, on softmax outputs (``cls_loss``). ``frozen_maps``:
    SAM fine-tuning draws from the maps the pre-trained model gives at the end of
    pre-training, never refreshed (fine-tuning's own maps come from the last block's CLS
    query, which a mean-pooling head never trains). ``arch``: "vit", or a timm CNN trained
    supervised (no patches, no masks). ``equal_flops``: a supervised row whose epochs match the
    training FLOPs of msmae_ft_all (``comparison.flops.equal_flops_epochs``).
    """

    name: str
    pretrain: PretrainKind
    finetune: MaskingStrategy
    pretrain_strategy: MaskingStrategy = "attention"
    align_maps: bool = True
    description: str = ""
    adapt: Callable[["Recipe"], "Recipe"] | None = None  # the method's own recipe, from the shared one
    cls_term: bool | None = None
    cls_loss: ClsLoss = "logits"
    frozen_maps: bool = False
    arch: Arch = "vit"
    equal_flops: bool = False

    def __post_init__(self) -> None:
        if self.frozen_maps and (self.pretrain != "msmae" or self.pretrain_strategy != "attention" or self.finetune != "attention"):
            raise ValueError(f"{self.name}: frozen maps need MSMAE pre-training and SAM fine-tuning by attention")
        if (self.arch != "vit" or self.equal_flops) and (self.pretrain != "none" or self.finetune != "all"):
            raise ValueError(f"{self.name}: a CNN or an equal-FLOPs row trains supervised on all tokens")

    def recipe_for(self, recipe: "Recipe") -> "Recipe":
        """The recipe this method trains with: the shared one, changed where its authors' differs."""
        return recipe if self.adapt is None else self.adapt(recipe)

    @property
    def finetune_sam(self) -> bool:
        """Does fine-tuning drop tokens (by attention or at random)?"""
        return self.finetune != "all"

    @property
    def uses_cls_term(self) -> bool:
        return self.pretrain == "msmae" if self.cls_term is None else self.cls_term

    @property
    def tuned_lr(self) -> str:
        """The recipe field the learning-rate grid sets: pre-training's blr, or the only stage's."""
        return "finetune_blr" if self.pretrain == "none" else "pretrain_blr"

    @property
    def pretrain_key(self) -> tuple:
        """What determines the pre-training (methods that share it can share one run of it)."""
        if self.pretrain != "msmae":  # MAE masks at random throughout: the SAM strategy plays no part
            return (self.pretrain, "random", self.align_maps, self.uses_cls_term, self.cls_loss)
        return (self.pretrain, self.pretrain_strategy, self.align_maps, self.uses_cls_term, self.cls_loss)


# MAE's official pre-training settings (facebookresearch/mae, PRETRAIN.md): per-patch normalised
# pixel targets, 40 warm-up epochs of 800 (5 %); masking 75 % is already the recipe's. Its blr
# 1.5e-4 is tuned for batch 4,096 over 800 epochs; at batch 64 over tens of epochs it left the
# encoder untrained (peak lr 3.75e-5, 6.7x below MSMAE's), so MAE's lr comes from the shared
# recipe or the learning-rate grid like every other method's.
MAE_OFFICIAL_BLR = 1.5e-4  # for reference only: not applied
MAE_WARMUP_FRACTION = 0.05


def mae_official(recipe: "Recipe") -> "Recipe":
    warmup = float(max(1, round(MAE_WARMUP_FRACTION * recipe.pretrain_epochs)))
    return replace(recipe, norm_pix_loss=True, pretrain_warmup=warmup)


def no_layer_decay(recipe: "Recipe") -> "Recipe":
    """Layer-wise lr decay keeps pre-trained lower blocks close to where pre-training left them;
    from random weights there is nothing to keep, and it would train blocks 0-5 at 2-13 % of the lr."""
    return replace(recipe, layer_decay=1.0)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("supervised", "none", "all", adapt=no_layer_decay,
               description="ViT from random init, all tokens, no layer decay, pre-training + fine-tuning epochs"),
        Method("supervised_eqflops", "none", "all", adapt=no_layer_decay, equal_flops=True,
               description="ViT from random init, all tokens, no layer decay, at msmae_ft_all's training FLOPs"),
        Method("resnet18", "none", "all", adapt=no_layer_decay, arch="resnet18",
               description="timm ResNet-18 from random init, supervised, the supervised ViT's epochs"),
        Method("mae", "mae", "all", adapt=mae_official,
               description="MAE pre-training on MAE's settings (random 75 %, no CLS loss, norm_pix_loss, 5 % warm-up) + all-token fine-tuning"),
        Method("mae_cls", "mae", "all", cls_term=True,
               description="control: random 75 % masking throughout + the CLS term, all-token fine-tuning"),
        Method("msmae", "msmae", "attention", description="MSMAE as the paper describes it: attention rule in both stages"),
        Method("msmae_frozen_maps", "msmae", "attention", frozen_maps=True,
               description="MSMAE pre-training + SAM fine-tuning on the pre-trained model's maps, never refreshed"),
        Method("msmae_ft_all", "msmae", "all", description="MSMAE pre-training (attention rule) + all-token fine-tuning"),
        Method("msmae_uniform_ft_all", "msmae", "all", pretrain_strategy="uniform",
               description="control: MSMAE pre-training with the uniform rule (CLS term kept) + all-token fine-tuning"),
        Method("msmae_released", "msmae", "uniform", pretrain_strategy="uniform", cls_loss="softmax_ce",
               description="the released code: uniform weights in both stages (random 45/30/25 %, random 25 % of tokens), "
                           "softmax before the CLS cross-entropy"),
    ]
}


def effective_recipe(method: Method, recipe: "Recipe", blr: float | None = None) -> "Recipe":
    """The recipe a run trains with: the method's own (``Method.adapt``), then the grid's
    learning rate (``blr``, into ``Method.tuned_lr``) when one is given."""
    adapted = method.recipe_for(recipe)
    return adapted if blr is None else replace(adapted, **{method.tuned_lr: float(blr)})


@dataclass(frozen=True)
class Recipe:
    """The shared training recipe: every method gets the same epochs, data, batch and lr rules.

    The method's hyper-parameters (learning rates, weight decay, layer decay, label smoothing,
    drop-path, mask/throw ratios, lambda, norm-pix loss) are the paper's, from ``msmae.defaults``;
    the size and schedule (ViT-S at 112 px with 8 px patches, batch 256, 10 + 10 epochs, SAM from
    epoch 3, refresh every 2) are this runner's own short-schedule choices, not any config file's.
    ``Recipe.for_epochs`` scales the epoch-valued ones to the epochs used.
    """

    preset: str = "small"
    img_size: int = 112
    patch_size: int | None = 8
    reg_tokens: int = 0
    pretrain_epochs: int = 10
    finetune_epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int = 512
    pretrain_blr: float = defaults.PRETRAIN_BLR
    pretrain_min_lr: float = 0.0
    pretrain_warmup: float = 1.0
    pretrain_weight_decay: float = defaults.WEIGHT_DECAY
    finetune_blr: float = defaults.FINETUNE_BLR
    finetune_min_lr: float = defaults.FINETUNE_MIN_LR
    finetune_warmup: float = 1.0
    finetune_weight_decay: float = defaults.WEIGHT_DECAY
    layer_decay: float = defaults.LAYER_DECAY
    label_smoothing: float = defaults.LABEL_SMOOTHING
    drop_path: float = defaults.DROP_PATH
    mask_ratio: float = defaults.MASK_RATIO
    throw_ratio: float = defaults.THROW_RATIO
    random_mask_ratio: float = defaults.RANDOM_MASK_RATIO
    cls_weight: float = defaults.CLS_WEIGHT
    norm_pix_loss: bool = defaults.NORM_PIX_LOSS
    sam_start: int = 3
    # SAM waits, from sam_start on, until the CLS head's validation balanced accuracy reaches
    # sam_gate (its maps follow a head that separates the classes), and starts at sam_latest at
    # the latest. None: SAM starts at sam_start whatever the head has learnt.
    sam_gate: float | None = None
    sam_latest: int | None = None
    refresh_every: int = 2
    finetune_refresh_every: int = 2
    finetune_all_tokens_from: float | None = None  # fraction of fine-tuning after which every token is used
    class_balance: bool = False  # weight cross-entropy by inverse class frequency (msmae.balanced_class_weights)
    map_source: str = "cls_attention"  # where the attention rule's maps come from (msmae.MAP_SOURCES)
    # further sources scored against the validation lesion masks at every refresh (a bundle with masks), for comparison
    # only: they cost time, they do not change training
    lesion_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.sam_gate is not None and not 0.0 < self.sam_gate <= 1.0:
            raise ValueError(f"sam_gate is a balanced accuracy in (0, 1], got {self.sam_gate}")
        if self.sam_latest is not None and self.sam_latest < self.sam_start:
            raise ValueError(f"sam_latest={self.sam_latest} is before sam_start={self.sam_start}")
        unknown = sorted({self.map_source, *self.lesion_sources} - set(msmae.MAP_SOURCES))
        if unknown:
            raise ValueError(f"unknown map sources {unknown}; choose from {msmae.MAP_SOURCES}")

    @classmethod
    def for_epochs(
        cls, pretrain_epochs: int, finetune_epochs: int, sam_start_fraction: float = 0.3, sam_latest_fraction: float = 0.5,
        **overrides,
    ) -> "Recipe":
        """A recipe whose warm-ups, SAM start and refresh intervals scale with the epochs.

        Warm-up: 10 % of each stage (the paper: 40 of 300 pre-training, 5 of 100 fine-tuning).
        SAM starts after ``sam_start_fraction`` of pre-training (the paper: 40 of 300, 13 %;
        on short schedules a CLS head must exist before its maps mean anything, hence 30 %
        by default or a ``sam_gate``), at ``sam_latest_fraction`` at the latest when gated;
        maps are refreshed every 20 % of a stage (the paper: fine-tuning every 20 of 100).
        """
        sam_start = max(1, round(sam_start_fraction * pretrain_epochs))
        scaled = {
            "pretrain_epochs": pretrain_epochs,
            "finetune_epochs": finetune_epochs,
            "pretrain_warmup": float(max(1, round(0.1 * pretrain_epochs))),
            "finetune_warmup": float(max(1, round(0.1 * finetune_epochs))),
            "sam_start": sam_start,
            "sam_latest": max(sam_start, round(sam_latest_fraction * pretrain_epochs)),
            "refresh_every": max(1, round(0.2 * pretrain_epochs)),
            "finetune_refresh_every": max(1, round(0.2 * finetune_epochs)),
        }
        merged = {**scaled, **overrides}
        if merged["sam_latest"] is not None and merged["sam_latest"] < merged["sam_start"]:
            merged["sam_latest"] = merged["sam_start"]  # an explicit later sam_start moves the deadline with it
        return cls(**merged)

    @property
    def ratios(self) -> MaskRatios:
        return MaskRatios(self.mask_ratio, self.throw_ratio, self.random_mask_ratio)

    def supervised_epochs(self) -> int:
        """Equal budget: training from scratch gets as many passes over the data as pre-training + fine-tuning."""
        return self.pretrain_epochs + self.finetune_epochs


@dataclass
class DeviceData:
    """A bundle decoded onto the device: uint8 images per split, labels, training aspects."""

    name: str
    classes: list[str]
    train: torch.Tensor  # [N, 3, S, S] at the bundle's side: augmentation crops from these
    train_plain: torch.Tensor  # [N, 3, img, img] whole images: attention maps are computed on these
    val: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    val_labels: torch.Tensor
    test_labels: torch.Tensor
    train_aspect: torch.Tensor
    decode_seconds: float = 0.0
    val_masks: torch.Tensor | None = None  # bool [N_val, img, img] lesion masks (bundles with masks); all False: none

    @property
    def val_has_mask(self) -> torch.Tensor | None:
        return None if self.val_masks is None else self.val_masks.flatten(1).any(dim=1)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_device_data(bundle: Bundle, img_size: int, device: torch.device | str) -> DeviceData:
    """Decode every image once onto ``device``; val, test and the plain training view resized whole."""
    start = time.perf_counter()
    device = torch.device(device)
    images = decode_all(bundle, device)
    part = {s: bundle.rows(s) for s in ("train", "val", "test")}
    if not len(part["val"]) or not len(part["test"]):
        raise ValueError(f"bundle {bundle.name} needs val and test splits for selection and report, has {bundle.counts()}")
    train_index = bundle.index[part["train"]]
    if not torch.equal(train_index, torch.arange(len(train_index))):
        raise ValueError("training rows must be the dataset's indices 0..n_train-1 (as ingest writes them)")
    take = {s: rows.to(device) for s, rows in part.items()}
    train = images[take["train"]]
    data = DeviceData(
        name=bundle.name,
        classes=list(bundle.classes),
        train=train,
        train_plain=resize_whole(train, img_size),
        val=resize_whole(images[take["val"]], img_size),
        test=resize_whole(images[take["test"]], img_size),
        train_labels=bundle.label[part["train"]].to(device),
        val_labels=bundle.label[part["val"]].to(device),
        test_labels=bundle.label[part["test"]].to(device),
        train_aspect=bundle.aspect[part["train"]].to(device),
    )
    if bundle.mask is not None:  # squashed like the val images: bundle side -> img_size (nearest, as PIL's NEAREST)
        masks = bundle.masks(part["val"]).to(device)[:, None].float()
        data.val_masks = torch.nn.functional.interpolate(masks, size=(img_size, img_size), mode="nearest-exact")[:, 0] > 0.5
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    data.decode_seconds = time.perf_counter() - start
    return data


# --- the two stages, each epoch through msmae.StageTrainer ---------------------------------

Progress = Callable[[dict], None]
Validate = Callable[[int], dict[str, float]]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def refresh_maps(
    model: torch.nn.Module, table: msmae.AttentionTable, data: DeviceData, recipe: Recipe, quality: dict, epoch: int,
) -> int:
    """Recompute every training image's map from the model as it is now (whole images, ``recipe.map_source``);
    how many. Where the new maps' mass lies (``msmae.map_quality``) goes into ``quality``, and, with
    validation lesion masks, how well they find the lesion (``lesion_scores``)."""
    index = torch.arange(len(data.train_plain), device=data.train_plain.device)
    batches = ((images, idx, data.train_labels[idx]) for images, idx in eval_batches(data.train_plain, index, recipe.eval_batch_size))
    start = time.perf_counter()
    refreshed = msmae.refresh_maps(model, batches, source=recipe.map_source)
    table.update(refreshed.index, refreshed.maps, epoch=epoch)
    quality.update(msmae.map_quality(refreshed.maps, refreshed.foreground).metrics(), refresh_seconds=time.perf_counter() - start)
    if data.val_masks is not None:
        quality.update(lesion_scores(model, data, recipe))
    return len(refreshed.index)


def lesion_scores(model: torch.nn.Module, data: DeviceData, recipe: Recipe) -> dict[str, float]:
    """Maps of the validation images that have lesion masks, from ``recipe.map_source`` (keys ``lesion_*``, plus the
    lesion share a SAM draw by them shows the encoder and masks) and from each of ``recipe.lesion_sources``
    (keys ``<source>/lesion_*``), scored against the masks; each source's seconds per 100 images too."""
    has = data.val_has_mask
    images, labels = data.val[has], data.val_labels[has]
    positions = torch.arange(len(images), device=images.device)
    lesion = msmae.lesion_patches(data.val_masks[has], recipe.patch_size or msmae.get_preset(recipe.preset).patch_size)
    out: dict[str, float] = {}
    for source in dict.fromkeys((recipe.map_source, *recipe.lesion_sources)):
        start = time.perf_counter()
        batches = ((x, i, labels[i]) for x, i in eval_batches(images, positions, recipe.eval_batch_size))
        maps = msmae.refresh_maps(model, batches, source=source).maps
        _sync(images.device)
        seconds = (time.perf_counter() - start) * 100 / max(len(images), 1)
        scores = {**msmae.lesion_scores(maps, lesion.cpu()).metrics(), "lesion_seconds_per_100": seconds}
        if source == recipe.map_source:
            split = msmae.sam_masking(maps, recipe.mask_ratio, recipe.throw_ratio, torch.Generator().manual_seed(0))
            out.update(scores, **msmae.masking_lesion_shares(split.kept, split.masked, lesion.cpu()))
        if source != recipe.map_source or recipe.lesion_sources:
            out.update({f"{source}/{k}": v for k, v in scores.items()})
    return out


def encoder_lesion_scores(encoder_state: dict, recipe: Recipe, data: DeviceData, device: torch.device) -> dict[str, float] | None:
    """``lesion_scores`` of a pre-trained encoder as it ends pre-training, from ``recipe.map_source`` and every one of
    ``recipe.lesion_sources`` (keys ``<source>/lesion_*``): whatever rule trained it, so the uniform and random rules'
    maps are scored like the attention rule's. None without ``lesion_sources`` or validation lesion masks."""
    if not recipe.lesion_sources or data.val_masks is None or not bool(data.val_has_mask.any()):
        return None
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    model = msmae.build_pretrain_model(preset, data.num_classes).to(device)
    model.load_state_dict(encoder_state)
    scores = lesion_scores(model.eval(), data, recipe)
    return {k: v for k, v in scores.items() if "/" in k}


def run_stage(
    trainer: msmae.StageTrainer, batches: TrainBatches, data: DeviceData, recipe: Recipe, device: torch.device,
    progress: Progress | None = None, validate: Validate | None = None, frozen_maps: bool = False,
    resume: StageResult | None = None, after_epoch: Callable[[int, StageResult], None] | None = None,
) -> StageResult:
    """Every epoch of the trainer's stage (one curve row each) and the stage's seconds.

    Maps are refreshed from the trainer's model when its schedule says so (never with
    ``frozen_maps``: the table keeps what it was given). ``validate(epoch)`` gives the
    epoch's validation headline; such rows also time the training alone (``train_seconds``).
    Epoch times count from before the map refresh. ``resume``: the stage so far (its curve's
    epochs are skipped, its seconds carried on); ``after_epoch(epoch, result)`` runs after
    each epoch's row is recorded and before ``progress`` (a checkpoint written there survives
    whatever ``progress`` does).
    """
    quality: dict[str, float] = {}
    refresh = (lambda epoch: 0) if frozen_maps else partial(refresh_maps, trainer.model, trainer.table, data, recipe, quality)
    stage, epochs = trainer.plan.stage, trainer.schedule.epochs
    result = StageResult(list(resume.curve), resume.seconds) if resume is not None else StageResult()
    prior = result.seconds
    # rules that never refresh maps (uniform, random) get their maps scored on the lesion masks on the same schedule,
    # so every pre-training rule has a lesion curve to set beside the attention rule's
    score_lesions = stage == "pretrain" and trainer.table is None and bool(recipe.lesion_sources) and data.val_masks is not None
    start = time.perf_counter()
    for epoch in range(len(result.curve), epochs):
        epoch_start = time.perf_counter()
        quality.clear()
        outcome = trainer.run_epoch(epoch, batches, len(batches), refresh)
        if score_lesions and (epoch + 1) % recipe.refresh_every == 0:
            quality.update(lesion_scores(trainer.model, data, recipe))
        row = {"stage": stage, "epoch": epoch, "epochs": epochs, "phase": outcome.phase, "maps_refreshed": outcome.maps_refreshed > 0,
               **{f"train_{k}": v for k, v in outcome.totals.means().items()}, **quality}  # one host sync per epoch
        timing = {}
        if validate is not None:
            timing["train_seconds"] = time.perf_counter() - epoch_start
            row.update({f"val_{k}": v for k, v in validate(epoch).items()})
        row.update(lr=max(g["lr"] for g in trainer.optimizer.param_groups), **timing,
                   seconds=time.perf_counter() - epoch_start, images=outcome.totals.seen)
        result.curve.append(row)
        if after_epoch is not None:
            result.seconds = prior + time.perf_counter() - start
            after_epoch(epoch, result)
        if progress:
            progress(row)
    _sync(device)
    result.seconds = prior + time.perf_counter() - start
    return result


def pretrain(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device, progress: Progress | None = None,
    checkpoints: Checkpointing | None = None, key: str = "",
) -> tuple[msmae.MSMAEPretrainModel, StageResult]:
    """MAE (``method.pretrain="mae"``: random masking throughout) or MSMAE pre-training (random
    masking until SAM starts, then SAM by ``method.pretrain_strategy``); the CLS term where
    ``method.uses_cls_term``.

    Epochs with the CLS term record its head's validation balanced accuracy on whole images;
    with ``recipe.sam_gate`` SAM starts once it reaches the gate (``SamGate``). With
    ``checkpoints`` (and the pre-training's ``key``) the state is saved as it goes and a run
    starts from the latest saved epoch."""
    torch.manual_seed(seed)
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    model = msmae.build_pretrain_model(preset, data.num_classes).to(device)
    optimizer = msmae.build_optimizer(model, "pretrain", weight_decay=recipe.pretrain_weight_decay)
    batches = TrainBatches(data.train, data.train_labels, data.train_aspect, recipe.img_size, recipe.batch_size, _generator(device, seed * 1000 + 1))
    mask_generator = _generator(device, seed * 1000 + 2)
    sam = method.pretrain == "msmae"
    cls = method.uses_cls_term
    gate = SamGate(recipe) if cls else None
    schedule = msmae.StageSchedule(
        recipe.pretrain_epochs, msmae.scaled_lr(recipe.pretrain_blr, recipe.batch_size), recipe.pretrain_min_lr,
        recipe.pretrain_warmup, msmae.MaskingSchedule(SamGate(recipe).first_start, recipe.refresh_every) if sam else None,
    )
    plan = msmae.EpochPlan(
        "pretrain", "random", recipe.ratios, strategy=method.pretrain_strategy if sam else "uniform", align_maps=method.align_maps,
        cls_weight=recipe.cls_weight if cls else 0.0, norm_pix_loss=recipe.norm_pix_loss, cls_loss=method.cls_loss,
        class_weights=class_weights(recipe, data) if cls else None,
    )
    table = msmae.AttentionTable(len(data.train), preset.grid, device=device) if sam and plan.uses_maps else None
    trainer = msmae.StageTrainer(model, optimizer, plan, schedule, table, mask_generator)
    validate = partial(gate.check, trainer, data) if cls else None
    resume, after_epoch = None, None
    if checkpoints is not None:
        state = checkpoints.load_latest(key)
        if state is not None:
            resume = restore_training_state(state, trainer, batches)
        after_epoch = partial(save_training_state, checkpoints, key, trainer, batches)
    result = run_stage(trainer, batches, data, recipe, device, progress, validate, resume=resume, after_epoch=after_epoch)
    if table is not None:  # the final model's maps, for fine-tuning that keeps them (frozen_maps)
        index = torch.arange(len(data.train_plain), device=data.train_plain.device)
        result.maps = msmae.refresh_maps(model, eval_batches(data.train_plain, index, recipe.eval_batch_size)).maps
    return model, result


def class_weights(recipe: Recipe, data: DeviceData) -> torch.Tensor | None:
    """Inverse-frequency cross-entropy weights from the training labels, when the recipe asks for them."""
    if not recipe.class_balance:
        return None
    return msmae.balanced_class_weights(torch.bincount(data.train_labels.cpu(), minlength=data.num_classes))


@torch.no_grad()
def cls_head_balanced_accuracy(model: msmae.MSMAEPretrainModel, data: DeviceData, batch_size: int) -> float:
    """Validation balanced accuracy of the pre-training model's CLS head on whole images."""
    was_training = model.training
    model.eval()
    try:
        logits = [model.classify(images).float() for images, _ in eval_batches(data.val, data.val_labels, batch_size)]
    finally:
        model.train(was_training)
    probs = torch.cat(logits).softmax(-1)
    return report_from_probs(probs.cpu(), data.val_labels.cpu(), data.num_classes).balanced_accuracy


@dataclass
class SamGate:
    """When MSMAE pre-training switches from random masking to SAM.

    Without a gate: at ``recipe.sam_start``. With ``recipe.sam_gate``: at the first epoch from
    ``sam_start`` on that follows an epoch whose CLS head reached the gate on validation, and at
    ``recipe.sam_latest`` at the latest, so a head that never gets there still leaves SAM time.
    """

    recipe: Recipe

    @property
    def first_start(self) -> int:
        """The start the schedule is built with: moved earlier by ``check`` when the head passes."""
        if self.recipe.sam_gate is None:
            return self.recipe.sam_start
        return self.recipe.sam_latest if self.recipe.sam_latest is not None else self.recipe.pretrain_epochs

    def check(self, trainer: msmae.StageTrainer, data: DeviceData, epoch: int) -> dict[str, float]:
        accuracy = cls_head_balanced_accuracy(trainer.model, data, self.recipe.eval_batch_size)
        masking = trainer.schedule.masking  # None: random masking throughout (mae_cls), nothing to gate
        waiting = self.recipe.sam_gate is not None and masking is not None and masking.sam_start > epoch + 1
        if waiting and epoch + 1 >= self.recipe.sam_start and accuracy >= self.recipe.sam_gate:
            trainer.schedule = replace(trainer.schedule, masking=replace(masking, sam_start=epoch + 1))
        return {"cls_balanced_accuracy": accuracy}


@dataclass
class _Selection:
    """The fine-tuning epoch with the best validation macro-F1 so far, and its weights."""

    epoch: int = -1
    val: dict = field(default_factory=dict)
    state: dict | None = None
    val_pred: list[int] = field(default_factory=list)

    def consider(self, epoch: int, val: dict, model: torch.nn.Module, probs: torch.Tensor) -> None:
        if val["macro_f1"] > self.val.get("macro_f1", -1.0):
            self.epoch, self.val = epoch, val
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.val_pred = probs.argmax(dim=1).tolist()


def build_finetune_model(method: Method, preset: msmae.ViTPreset, num_classes: int, drop_path: float) -> torch.nn.Module:
    """The classifier a method fine-tunes: the ViT, or a timm CNN from random weights."""
    if method.arch == "vit":
        return msmae.build_classifier(preset, num_classes, drop_path_rate=drop_path)
    return flops_mod.build_cnn(method.arch, num_classes, preset, drop_path)


def finetune(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device,
    encoder_state: dict | None, epochs: int, warmup: float, progress: Progress | None = None,
    maps: torch.Tensor | None = None,
) -> tuple[dict, StageResult]:
    """Fine-tune (from ``encoder_state``, or from scratch when None); select by val macro-F1; test once.

    ``maps`` ([N, L]): with ``method.frozen_maps``, the maps SAM draws from throughout."""
    torch.manual_seed(seed * 1000 + 3)
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    model = build_finetune_model(method, preset, data.num_classes, recipe.drop_path)
    if encoder_state is not None:
        msmae.load_pretrained_encoder(model, encoder_state)
    model = model.to(device)
    optimizer = msmae.build_optimizer(model, "finetune", weight_decay=recipe.finetune_weight_decay, layer_decay=recipe.layer_decay)
    batches = TrainBatches(data.train, data.train_labels, data.train_aspect, recipe.img_size, recipe.batch_size, _generator(device, seed * 1000 + 4))
    mask_generator = _generator(device, seed * 1000 + 5)
    sam = method.finetune_sam
    masking = msmae.MaskingSchedule.until_fraction(0, recipe.finetune_refresh_every, recipe.finetune_all_tokens_from, epochs)
    schedule = msmae.StageSchedule(
        epochs, msmae.scaled_lr(recipe.finetune_blr, recipe.batch_size), recipe.finetune_min_lr, warmup, masking if sam else None,
    )
    plan = msmae.EpochPlan(
        "finetune", schedule.phase(0), recipe.ratios, strategy=method.finetune, align_maps=method.align_maps,
        label_smoothing=recipe.label_smoothing, class_weights=class_weights(recipe, data),
    )
    table = msmae.AttentionTable(len(data.train), preset.grid, device=device) if plan.uses_maps else None
    if method.frozen_maps:
        if maps is None:
            raise ValueError(f"{method.name} fine-tunes on the pre-training's maps: pass them (pretrain's StageResult.maps)")
        table.update(torch.arange(len(maps)), maps, epoch=-1)
    trainer = msmae.StageTrainer(model, optimizer, plan, schedule, table, mask_generator)
    best = _Selection()

    def validate(epoch: int) -> dict[str, float]:
        report, probs, _ = evaluate(model, eval_batches(data.val, data.val_labels, recipe.eval_batch_size), data.num_classes)
        val = _headline(report)
        best.consider(epoch, val, model, probs)
        return val

    result = run_stage(trainer, batches, data, recipe, device, progress, validate, frozen_maps=method.frozen_maps)
    test_start = time.perf_counter()
    model.load_state_dict(best.state)
    report, probs, _ = evaluate(model, eval_batches(data.test, data.test_labels, recipe.eval_batch_size), data.num_classes)
    # per-image predictions of the selected state, in the bundle's split order (labels: the bundle's), for paired tests
    predictions = {"val_pred": best.val_pred, "test_pred": probs.argmax(dim=1).tolist(),
                   "val_label": data.val_labels.cpu().tolist(), "test_label": data.test_labels.cpu().tolist()}
    selection = {"selected_epoch": best.epoch, "val": best.val, "test": _headline(report), "test_confusion": report.confusion,
                 "test_seconds": time.perf_counter() - test_start, "predictions": predictions}
    return selection, result


def _headline(report: msmae.ClassificationReport) -> dict[str, float]:
    return {k: report.scalars()[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "loss")}


# --- one method, one seed ----------------------------------------------------------------


def pretrain_key(method: Method, recipe: Recipe, data: DeviceData, seed: int) -> tuple:
    """What a pre-training depends on: the method's pre-training rule, its recipe (as the run
    trains with it: ``effective_recipe``), the data, the seed."""
    return (*method.pretrain_key, seed, recipe, data.name, tuple(data.counts().items()))


def pretrained_encoder(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device,
    progress: Progress | None = None, cache: PretrainCache | None = None,
) -> tuple[dict, StageResult, bool]:
    """The method's pre-trained encoder state, its curve, and whether it came from ``cache``.
    ``recipe`` is the run's own (``effective_recipe``)."""
    key = pretrain_key(method, recipe, data, seed)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return *found, True
    checkpoints = cache.checkpointing(key) if cache is not None else None
    model, result = pretrain(method, recipe, data, seed, device, progress, checkpoints, repr(key))
    encoder_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cache is not None:
        cache.put(key, encoder_state, result)
    return encoder_state, result, False


def finetune_epochs(method: Method, recipe: Recipe, flops: flops_mod.StepFlops | None = None) -> tuple[int, float]:
    """A method's fine-tuning epochs and warm-up: the recipe's after pre-training; from scratch,
    pre-training + fine-tuning epochs, or (``equal_flops``) the epochs at msmae_ft_all's FLOPs."""
    if method.pretrain != "none":
        return recipe.finetune_epochs, recipe.finetune_warmup
    if method.equal_flops:
        epochs, _ = flops_mod.equal_flops_epochs(recipe.pretrain_epochs, recipe.sam_start, recipe.finetune_epochs, flops)
    else:
        epochs = recipe.supervised_epochs()
    return epochs, float(max(1, round(0.1 * epochs)))


def step_flops(recipe: Recipe, num_classes: int) -> flops_mod.StepFlops:
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    return flops_mod.measure(preset, num_classes, recipe.ratios)


def run_method(
    method: Method | str,
    recipe: Recipe,
    data: DeviceData,
    seed: int,
    device: torch.device | str,
    progress: Progress | None = None,
    cache: PretrainCache | None = None,
    blr: float | None = None,
    from_snapshot: int | None = None,
) -> dict:
    """Pre-train (if the method does), fine-tune, select on val, test once: one JSON-able record.

    ``blr``: the learning-rate grid's value for ``method.tuned_lr`` (None: the recipe's).
    ``from_snapshot``: fine-tune from the encoder after that many pre-training epochs (the
    cache's ``snapshots``; the whole pre-training runs, or resumes, first)."""
    method = METHODS[method] if isinstance(method, str) else method
    device = torch.device(device)
    wall_start = time.perf_counter()
    recipe = effective_recipe(method, recipe, blr)
    flops = step_flops(recipe, data.num_classes)
    pre = StageResult()
    encoder_state, shared = None, False
    if method.pretrain != "none":
        encoder_state, pre, shared = pretrained_encoder(method, recipe, data, seed, device, progress, cache)
        if from_snapshot is not None:
            ran_here = 0.0 if shared else pre.seconds  # the whole pre-training, if this call ran it
            if cache is None:
                raise ValueError("fine-tuning from a pre-training snapshot needs a PretrainCache with a directory")
            encoder_state, pre = cache.snapshot(pretrain_key(method, recipe, data, seed), from_snapshot)
            if method.frozen_maps:
                raise ValueError(f"{method.name}: snapshots keep no maps; fine-tune them on all tokens")
    scoring_start = time.perf_counter()
    encoder_lesion = encoder_lesion_scores(encoder_state, recipe, data, device) if encoder_state is not None else None
    scoring_seconds = time.perf_counter() - scoring_start  # a measurement, not training: kept out of the wall time
    ft_epochs, warmup = finetune_epochs(method, recipe, flops)
    selection, ft = finetune(method, recipe, data, seed, device, encoder_state, ft_epochs, warmup, progress, pre.maps)
    measured = time.perf_counter() - wall_start - scoring_seconds
    if from_snapshot is not None:  # as if run alone: pre-training up to the snapshot, then fine-tuning
        measured -= ran_here
    refreshed = sum(len(data.train) for r in [*pre.curve, *ft.curve] if r.get("maps_refreshed"))
    compute = flops_mod.run_flops(pre.curve, ft.curve, method.finetune, method.arch, flops, data.counts(), refreshed)
    pretrain_epochs = len(pre.curve)
    return {
        "method": method.name,
        "description": method.description,
        "seed": seed,
        "dataset": data.name,
        "classes": data.classes,
        "counts": data.counts(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "recipe": asdict(recipe),
        "tuned_lr": {"field": method.tuned_lr, "blr": getattr(recipe, method.tuned_lr), "from_grid": blr is not None},
        "pretrain_epochs": pretrain_epochs,
        "pretrain_checkpoint_epoch": from_snapshot,
        # the first SAM epoch of pre-training (None: MAE, no pre-training, or SAM never started)
        "sam_started_epoch": next((r["epoch"] for r in pre.curve if r["phase"] == "sam"), None),
        "finetune_epochs": ft_epochs,
        "image_passes": pretrain_epochs + ft_epochs,
        "flops": compute,
        "train_flops": compute["train"],
        "step_flops_per_image": flops.as_dict(),
        **selection,
        "pretrain_curve": pre.curve,
        # the final pre-trained encoder's maps scored against the validation lesion masks, per source (with --lesion-sources)
        "pretrain_lesion": encoder_lesion,
        "finetune_curve": ft.curve,
        "pretrain_seconds": pre.seconds,
        "finetune_seconds": ft.seconds,
        "pretrain_shared": shared,
        # wall time of the method as if run alone: a reused pre-training counts its measured time
        "wall_seconds": measured + (pre.seconds if shared or from_snapshot is not None else 0.0),
        "measured_seconds": measured,
    }
