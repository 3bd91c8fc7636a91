"""Train and test one method end to end in one process, on data held on the device.

For a comparison on a single GPU box that has torch and timm but no Ray or MLflow. The
dataset comes from a bundle (``comparison.bundle``), is decoded once onto the device, and
augmented there (``comparison.augment``); every epoch is ``msmae.StageTrainer.run_epoch``,
the same epoch skeleton the Ray workers run, with the same optimisers
(``msmae.build_optimizer``), learning-rate schedule, masking schedule and attention-table
refreshes as ``pipelines/train/worker.py``.

Methods (``METHODS``), each on its own recipe where its authors' differs (``Method.adapt``):
    supervised        ViT from random init on all tokens, no pre-training, no layer decay
    mae               MAE pre-training on MAE's own defaults (random 75 %, no CLS loss, blr 1.5e-4,
                      norm_pix_loss, 5 % warm-up) + all-token fine-tuning
    msmae             MSMAE pre-training (random warm-up, then SAM by attention) + SAM fine-tuning
    msmae_ft_all      MSMAE pre-training (attention rule) + all-token fine-tuning
    msmae_released    the released code's rule: uniform weights in both stages

Protocol: validate on whole images after every fine-tuning epoch, keep the state with the
best validation macro-F1, evaluate it once on the test split.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch

import msmae
from comparison.augment import TrainBatches, eval_batches, resize_whole
from comparison.bundle import Bundle, decode_all
from msmae import defaults
from msmae import MaskingStrategy, MaskRatios, evaluate, report_from_probs

PretrainKind = Literal["none", "mae", "msmae"]


@dataclass(frozen=True)
class Method:
    """What a compared method changes; everything else is the shared ``Recipe``.

    ``finetune`` is the fine-tuning masking strategy (``msmae.loop.MaskingStrategy``: the
    paper's attention rule, the released code's uniform draw, or all tokens);
    ``pretrain_strategy`` the same choice for MSMAE pre-training's SAM phase.
    """

    name: str
    pretrain: PretrainKind
    finetune: MaskingStrategy
    pretrain_strategy: MaskingStrategy = "attention"
    align_maps: bool = True
    description: str = ""
    adapt: Callable[["Recipe"], "Recipe"] | None = None  # the method's own recipe, from the shared one

    def recipe_for(self, recipe: "Recipe") -> "Recipe":
        """The recipe this method trains with: the shared one, changed where its authors' differs."""
        return recipe if self.adapt is None else self.adapt(recipe)

    @property
    def finetune_sam(self) -> bool:
        """Does fine-tuning drop tokens (by attention or at random)?"""
        return self.finetune != "all"

    @property
    def pretrain_key(self) -> tuple:
        """What determines the pre-training (methods that share it can share one run of it)."""
        return (self.pretrain, self.pretrain_strategy, self.align_maps)


# MAE's official pre-training defaults (facebookresearch/mae, PRETRAIN.md): blr 1.5e-4, per-patch
# normalised pixel targets, 40 warm-up epochs of 800 (5 %); masking 75 % is already the recipe's.
MAE_PRETRAIN_BLR = 1.5e-4
MAE_WARMUP_FRACTION = 0.05


def mae_official(recipe: "Recipe") -> "Recipe":
    warmup = float(max(1, round(MAE_WARMUP_FRACTION * recipe.pretrain_epochs)))
    return replace(recipe, pretrain_blr=MAE_PRETRAIN_BLR, norm_pix_loss=True, pretrain_warmup=warmup)


def no_layer_decay(recipe: "Recipe") -> "Recipe":
    """Layer-wise lr decay keeps pre-trained lower blocks close to where pre-training left them;
    from random weights there is nothing to keep, and it would train blocks 0-5 at 2-13 % of the lr."""
    return replace(recipe, layer_decay=1.0)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("supervised", "none", "all", adapt=no_layer_decay,
               description="ViT from random init, all tokens, no layer decay"),
        Method("mae", "mae", "all", adapt=mae_official,
               description="MAE pre-training on MAE's defaults (random 75 %, no CLS loss, blr 1.5e-4, norm_pix_loss) + all-token fine-tuning"),
        Method("msmae", "msmae", "attention", description="MSMAE as the paper describes it: attention rule in both stages"),
        Method("msmae_ft_all", "msmae", "all", description="MSMAE pre-training (attention rule) + all-token fine-tuning"),
        Method("msmae_released", "msmae", "uniform", pretrain_strategy="uniform",
               description="the released code's rule: uniform weights in both stages (random 45/30/25 %, random 25 % of tokens)"),
    ]
}


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


@dataclass
class StageResult:
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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


def run_stage(
    trainer: msmae.StageTrainer, batches: TrainBatches, data: DeviceData, recipe: Recipe, device: torch.device,
    progress: Progress | None = None, validate: Validate | None = None,
) -> StageResult:
    """Every epoch of the trainer's stage (one curve row each) and the stage's seconds.

    Maps are refreshed from the trainer's model when its schedule says so. ``validate(epoch)``
    (fine-tuning) gives the epoch's validation headline; such rows also time the training
    alone (``train_seconds``). Epoch times count from before the map refresh.
    """
    quality: dict[str, float] = {}
    refresh = partial(refresh_maps, trainer.model, trainer.table, data, recipe, quality)
    stage, epochs = trainer.plan.stage, trainer.schedule.epochs
    result = StageResult()
    start = time.perf_counter()
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        quality.clear()
        outcome = trainer.run_epoch(epoch, batches, len(batches), refresh)
        row = {"stage": stage, "epoch": epoch, "epochs": epochs, "phase": outcome.phase, "maps_refreshed": outcome.maps_refreshed > 0,
               **{f"train_{k}": v for k, v in outcome.totals.means().items()}, **quality}  # one host sync per epoch
        timing = {}
        if validate is not None:
            timing["train_seconds"] = time.perf_counter() - epoch_start
            row.update({f"val_{k}": v for k, v in validate(epoch).items()})
        row.update(lr=max(g["lr"] for g in trainer.optimizer.param_groups), **timing,
                   seconds=time.perf_counter() - epoch_start, images=outcome.totals.seen)
        result.curve.append(row)
        if progress:
            progress(row)
    _sync(device)
    result.seconds = time.perf_counter() - start
    return result


def pretrain(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device, progress: Progress | None = None,
) -> tuple[msmae.MSMAEPretrainModel, StageResult]:
    """MAE (``method.pretrain="mae"``: random masking throughout, no CLS loss) or MSMAE pre-training
    (random masking until SAM starts, then SAM by ``method.pretrain_strategy``).

    MSMAE epochs record the CLS head's validation balanced accuracy on whole images; with
    ``recipe.sam_gate`` SAM starts once it reaches the gate (``SamGate``)."""
    torch.manual_seed(seed)
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    model = msmae.build_pretrain_model(preset, data.num_classes).to(device)
    optimizer = msmae.build_optimizer(model, "pretrain", weight_decay=recipe.pretrain_weight_decay)
    batches = TrainBatches(data.train, data.train_labels, data.train_aspect, recipe.img_size, recipe.batch_size, _generator(device, seed * 1000 + 1))
    mask_generator = _generator(device, seed * 1000 + 2)
    sam = method.pretrain == "msmae"
    gate = SamGate(recipe) if sam else None
    schedule = msmae.StageSchedule(
        recipe.pretrain_epochs, msmae.scaled_lr(recipe.pretrain_blr, recipe.batch_size), recipe.pretrain_min_lr,
        recipe.pretrain_warmup, msmae.MaskingSchedule(gate.first_start, recipe.refresh_every) if sam else None,
    )
    plan = msmae.EpochPlan(
        "pretrain", "random", recipe.ratios, strategy=method.pretrain_strategy, align_maps=method.align_maps,
        cls_weight=recipe.cls_weight if sam else 0.0, norm_pix_loss=recipe.norm_pix_loss,
        class_weights=class_weights(recipe, data) if sam else None,
    )
    table = msmae.AttentionTable(len(data.train), preset.grid, device=device) if sam and plan.uses_maps else None
    trainer = msmae.StageTrainer(model, optimizer, plan, schedule, table, mask_generator)
    validate = partial(gate.check, trainer, data) if sam else None
    return model, run_stage(trainer, batches, data, recipe, device, progress, validate)


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
        masking = trainer.schedule.masking
        waiting = self.recipe.sam_gate is not None and masking.sam_start > epoch + 1
        if waiting and epoch + 1 >= self.recipe.sam_start and accuracy >= self.recipe.sam_gate:
            trainer.schedule = replace(trainer.schedule, masking=replace(masking, sam_start=epoch + 1))
        return {"cls_balanced_accuracy": accuracy}


@dataclass
class _Selection:
    """The fine-tuning epoch with the best validation macro-F1 so far, and its weights."""

    epoch: int = -1
    val: dict = field(default_factory=dict)
    state: dict | None = None

    def consider(self, epoch: int, val: dict, model: torch.nn.Module) -> None:
        if val["macro_f1"] > self.val.get("macro_f1", -1.0):
            self.epoch, self.val = epoch, val
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device,
    encoder_state: dict | None, epochs: int, warmup: float, progress: Progress | None = None,
) -> tuple[dict, StageResult]:
    """Fine-tune (from ``encoder_state``, or from scratch when None); select by val macro-F1; test once."""
    torch.manual_seed(seed * 1000 + 3)
    preset = msmae.get_preset(recipe.preset, recipe.img_size, recipe.patch_size, recipe.reg_tokens)
    model = msmae.build_classifier(preset, data.num_classes, drop_path_rate=recipe.drop_path)
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
    trainer = msmae.StageTrainer(model, optimizer, plan, schedule, table, mask_generator)
    best = _Selection()

    def validate(epoch: int) -> dict[str, float]:
        report, _, _ = evaluate(model, eval_batches(data.val, data.val_labels, recipe.eval_batch_size), data.num_classes)
        val = _headline(report)
        best.consider(epoch, val, model)
        return val

    result = run_stage(trainer, batches, data, recipe, device, progress, validate)
    test_start = time.perf_counter()
    model.load_state_dict(best.state)
    report, _, _ = evaluate(model, eval_batches(data.test, data.test_labels, recipe.eval_batch_size), data.num_classes)
    selection = {"selected_epoch": best.epoch, "val": best.val, "test": _headline(report), "test_confusion": report.confusion,
                 "test_seconds": time.perf_counter() - test_start}
    return selection, result


def _headline(report: msmae.ClassificationReport) -> dict[str, float]:
    return {k: report.scalars()[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "loss")}


# --- one method, one seed ----------------------------------------------------------------


@dataclass
class PretrainCache:
    """Pre-trained encoders kept for reuse, keyed by what determines them.

    ``msmae`` and ``msmae_ft_all`` pre-train identically (same seed, same recipe): the second
    reuses the first's encoder, so their fine-tuning results differ only by fine-tuning. With a
    ``directory`` every pre-training is also saved there and found by a later process: a GPU
    box whose commands are capped at 10 minutes pre-trains in one call and fine-tunes in the
    next (``compare.py --stage pretrain``, then the same command without it).
    """

    entries: dict[tuple, tuple[dict, StageResult]] = field(default_factory=dict)
    directory: Path | None = None

    def path(self, key: tuple) -> Path:
        return self.directory / f"pretrain-{hashlib.sha1(repr(key).encode()).hexdigest()[:16]}.pt"

    def get(self, key: tuple) -> tuple[dict, StageResult] | None:
        if key not in self.entries and self.directory is not None and self.path(key).is_file():
            saved = torch.load(self.path(key), map_location="cpu", weights_only=True)  # tensors and plain values only
            if saved["key"] != repr(key):
                raise ValueError(f"{self.path(key)} holds another pre-training ({saved['key'][:120]}...); remove it")
            self.entries[key] = (saved["encoder_state"], StageResult(saved["curve"], saved["seconds"]))
        return self.entries.get(key)

    def put(self, key: tuple, encoder_state: dict, result: StageResult) -> None:
        self.entries[key] = (encoder_state, result)
        if self.directory is not None:  # written whole or not at all: a killed call leaves no half file
            self.directory.mkdir(parents=True, exist_ok=True)
            payload = {"key": repr(key), "encoder_state": {k: v.cpu() for k, v in encoder_state.items()},
                       "curve": result.curve, "seconds": result.seconds}
            partial_path = self.path(key).with_suffix(".partial")
            torch.save(payload, partial_path)
            partial_path.replace(self.path(key))


def pretrain_key(method: Method, recipe: Recipe, data: DeviceData, seed: int) -> tuple:
    """What a pre-training depends on: the method's pre-training rule, its recipe, the data, the seed."""
    return (*method.pretrain_key, seed, method.recipe_for(recipe), data.name, tuple(data.counts().items()))


def pretrained_encoder(
    method: Method, recipe: Recipe, data: DeviceData, seed: int, device: torch.device,
    progress: Progress | None = None, cache: PretrainCache | None = None,
) -> tuple[dict, StageResult, bool]:
    """The method's pre-trained encoder state, its curve, and whether it came from ``cache``."""
    key = pretrain_key(method, recipe, data, seed)
    found = cache.get(key) if cache is not None else None
    if found is not None:
        return *found, True
    model, result = pretrain(method, method.recipe_for(recipe), data, seed, device, progress)
    encoder_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cache is not None:
        cache.put(key, encoder_state, result)
    return encoder_state, result, False


def run_method(
    method: Method | str,
    recipe: Recipe,
    data: DeviceData,
    seed: int,
    device: torch.device | str,
    progress: Progress | None = None,
    cache: PretrainCache | None = None,
) -> dict:
    """Pre-train (if the method does), fine-tune, select on val, test once: one JSON-able record."""
    method = METHODS[method] if isinstance(method, str) else method
    device = torch.device(device)
    wall_start = time.perf_counter()
    pre = StageResult()
    encoder_state, shared = None, False
    if method.pretrain != "none":
        encoder_state, pre, shared = pretrained_encoder(method, recipe, data, seed, device, progress, cache)
    recipe = method.recipe_for(recipe)
    if method.pretrain == "none":
        ft_epochs, warmup = recipe.supervised_epochs(), float(max(1, round(0.1 * recipe.supervised_epochs())))
    else:
        ft_epochs, warmup = recipe.finetune_epochs, recipe.finetune_warmup
    selection, ft = finetune(method, recipe, data, seed, device, encoder_state, ft_epochs, warmup, progress)
    measured = time.perf_counter() - wall_start
    return {
        "method": method.name,
        "description": method.description,
        "seed": seed,
        "dataset": data.name,
        "classes": data.classes,
        "counts": data.counts(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "recipe": asdict(recipe),
        "pretrain_epochs": recipe.pretrain_epochs if method.pretrain != "none" else 0,
        # the first SAM epoch of pre-training (None: MAE, no pre-training, or SAM never started)
        "sam_started_epoch": next((r["epoch"] for r in pre.curve if r["phase"] == "sam"), None),
        "finetune_epochs": ft_epochs,
        "image_passes": (recipe.pretrain_epochs if method.pretrain != "none" else 0) + ft_epochs,
        **selection,
        "pretrain_curve": pre.curve,
        "finetune_curve": ft.curve,
        "pretrain_seconds": pre.seconds,
        "finetune_seconds": ft.seconds,
        "pretrain_shared": shared,
        # wall time of the method as if run alone: a reused pre-training counts its measured time
        "wall_seconds": measured + (pre.seconds if shared else 0.0),
        "measured_seconds": measured,
    }
