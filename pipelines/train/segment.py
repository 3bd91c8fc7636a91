"""``msmae segment``: the encoder as a lesion segmenter, trained on Ray Train, chosen on validation, tested once, registered.

One MLflow run: the segmentation stage (``segment_worker``) on the training stream with its
masks, validation Dice / IoU each epoch (``segment/val_dice``), Ray keeping the best checkpoints
by ``segment.metric``; then the chosen checkpoint is scored on validation and, once, on test,
at each image's own size through the served decode path (``pipelines.serve.segment_evaluate``),
a figure of predicted vs true contours is logged, and the segmenter is registered as a pyfunc
with its model card (``pipelines.serve.segment_registry``), its alias decided first by
``pipelines.serve.segment_promotion`` (a quality gate against trivial masks, then the champion
scored on the same validation images). The encoder starts from a
pre-training checkpoint (``--init``: MSMAE or MAE pre-training, any masking rule) or from random
weights. Not resumable yet: a stopped run is started again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from pipelines import checkpoint, tracking
from pipelines.config import RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.data.ingest_options import IngestError
from pipelines.data.preprocessing import Preprocessing
from pipelines.data.streams import eval_stream, train_stream
from pipelines.local_ray import ensure_ray, quiet_ray_data
from pipelines.serve import registry, segment_promotion, segment_registry
from pipelines.serve.promotion import Decision
from pipelines.serve.segment_evaluate import contour_figure, evaluate_masks
from pipelines.serve.segment_pyfunc import MaskPredictor
from pipelines.train.launcher import StageDataConfig
from pipelines.train.run import check_workdir, run_prefix, workdir_lock
from pipelines.train.stages import best_checkpoint
from pipelines.train.segment_worker import SegmentSpec, segment_loop


@dataclass
class SegmentOutcome:
    run_name: str
    mlflow_run_id: str
    checkpoint: str  # the chosen checkpoint folder
    model_name: str
    version: str
    alias: str | None  # None: not promoted (the quality gate failed, or another dataset's champion stays)
    why: str  # the promotion decision's one line
    val: dict
    test: dict | None
    seconds: float


def check_segmentable(dataset: IngestedDataset, cfg: RunConfig) -> None:
    """What the workers would trip over minutes later, checked before Ray starts."""
    if not dataset.has_masks:
        raise IngestError(f"{dataset.path} has no lesion masks; ingest it with --masks DIR (or --mask-col) to train a segmenter")
    for split in ("train", "val"):
        if not dataset.split_size(split):
            raise IngestError(f"{dataset.path}: the {split} split is empty; ingest more images or another --val")
    per_step = max(1, cfg.segment.batch_size // cfg.scaling.workers) * cfg.scaling.workers
    if dataset.split_size("train") < per_step:
        raise IngestError(f"{dataset.path}: the train split has {dataset.split_size('train')} images, fewer than one segment batch "
                          f"({per_step} over {cfg.scaling.workers} workers); lower segment.batch_size (e.g. --set "
                          f"segment.batch_size={max(1, dataset.split_size('train') // 2)})")


def check_init(init_checkpoint: str | None, cfg: RunConfig) -> None:
    """A pre-training checkpoint at another architecture or size would fail inside every worker: refused here."""
    if init_checkpoint is None:
        return
    preset = checkpoint.preset_of(checkpoint.read_state(init_checkpoint))
    if preset != cfg.preset():
        raise ValueError(f"--init {init_checkpoint} was pre-trained as {preset}, but this run builds {cfg.preset()}; set model.preset, "
                         "data.img_size and model.patch_size to the pre-training's (e.g. the same --config)")


def run_segment_stage(spec: SegmentSpec, dataset: IngestedDataset, storage: Path, name: str, callbacks: list | None = None) -> ray.train.Result:
    """The segmentation stage as one TorchTrainer over the training stream (masks included) and the validation stream."""
    quiet_ray_data()
    cfg = spec.config
    size = cfg.data.img_size
    per_worker_batch = max(1, cfg.segment.batch_size // cfg.scaling.workers)
    datasets = {
        "train": train_stream(dataset, "train", size, cfg.data.seed, batch_size=per_worker_batch, uint8=cfg.scaling.use_gpu),
        "val": eval_stream(dataset, "val", size),
    }
    trainer = TorchTrainer(
        segment_loop,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.worker_resources}),
        run_config=TrainRunConfig(
            name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute=cfg.segment.metric,
                                               checkpoint_score_order="max"),
            logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=StageDataConfig(),
    )
    return trainer.fit()


def run_segmentation(
    source: Path, cfg: RunConfig, workdir: Path, tracking_uri: str, init_checkpoint: str | None = None,
    log: Callable[[str], None] = print, config_name: str = "config",
) -> SegmentOutcome:
    """Train, select, test once and register a segmenter on an ingested dataset with masks (see the module docstring)."""
    start = time.time()
    workdir = workdir.resolve()
    if not IngestedDataset.is_ingested(source):
        raise IngestError(f"{source} is not an ingested dataset; run `msmae ingest ... --masks DIR --out FOLDER` first "
                          "(a segmenter needs each image's lesion mask)")
    check_workdir(source, workdir)
    dataset = IngestedDataset.load(source)
    check_segmentable(dataset, cfg)
    check_init(init_checkpoint, cfg)
    classifier_name = registry.default_name(dataset.summary, dataset.path)
    values = {"tracking.model_name": segment_registry.default_name(classifier_name)} if cfg.tracking.model_name is None else {}
    if cfg.tracking.experiment is None:
        values["tracking.experiment"] = classifier_name
    cfg = cfg.with_values(values) if values else cfg
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        ensure_ray(scaling=cfg.scaling)
        tracking.set_experiment(tracking_uri, cfg.tracking.experiment, workdir)
        run_name = time.strftime(f"{run_prefix(dataset, config_name, ('segment',))}-%Y%m%d-%H%M%S")
        with tracking.active_run(None, run_name) as run:
            tracking.log_run_inputs(cfg.public_dump(), cfg.flat(), dataset.summary_file,
                                    {"msmae.stages": "segment", "msmae.task": "segmentation", "msmae.init_checkpoint": init_checkpoint or ""})
            log(f"segmentation: {cfg.model.preset} ViT at {cfg.data.img_size} px, encoder "
                f"{'from ' + init_checkpoint if init_checkpoint else 'from scratch (random weights)'}, {cfg.segment.epochs} epochs, "
                f"{cfg.scaling.workers} {'GPU' if cfg.scaling.use_gpu else 'CPU'} workers")
            spec = SegmentSpec(cfg, dataset.split_size("train"), init_checkpoint, tracking_uri, run.info.run_id)
            result = run_segment_stage(spec, dataset, workdir / "storage", f"{run_name}-segment")
            best_dir, _ = best_checkpoint(result, cfg.segment.metric)
            outcome = finish_segmentation(best_dir, dataset, cfg, log, init_checkpoint)
        seconds = time.time() - start
        aliased = f" as @{outcome['alias']}" if outcome["alias"] else " (no alias)"
        log(f"registered {cfg.tracking.model_name} version {outcome['version']}{aliased}; done in {seconds:.0f} s")
        return SegmentOutcome(run_name, run.info.run_id, best_dir, cfg.tracking.model_name, outcome["version"], outcome["alias"],
                              outcome["why"], outcome["val"], outcome["test"], seconds)


def finish_segmentation(best_dir: str, dataset: IngestedDataset, cfg: RunConfig, log: Callable[[str], None],
                        init_checkpoint: str | None = None, version_tags: dict[str, str] | None = None) -> dict:
    """The chosen checkpoint scored on validation and (once) test at each image's size, a contour figure, judged
    (``segment_promotion``: the quality gate, then the champion scored on the same validation images), registered."""
    import json

    model = checkpoint.load_segmenter(best_dir)
    epoch = int(json.loads((Path(best_dir) / checkpoint.META_FILE).read_text()).get("metrics", {}).get("epoch", 0))
    prep = Preprocessing(img_size=model.preset.img_size, mode=dataset.summary.get("mode", "RGB"),
                         max_side=(dataset.summary.get("options") or {}).get("max_side"))
    predictor = MaskPredictor(model, prep, cfg.segment.threshold)
    # the checkpoint folder alone is then enough for `msmae predict --model FOLDER` (same decode as the registered model)
    checkpoint.write_inference(best_dir, temperature=1.0, preprocessing=prep.to_dict(), calibration={})
    val = evaluate_masks(predictor, dataset, "val", examples=8)
    log(val.line() + f" (chosen on validation {cfg.segment.metric}, epoch {epoch})")
    test = evaluate_masks(predictor, dataset, "test") if dataset.split_size("test") else None
    if test is not None:
        log(test.line() + " (evaluated once, after selection)")
    tracking.log_dataset_input(dataset)
    tracking.log_report({f"final_val/{k}": v for k, v in val.scalars().items()}, None, None, step=epoch)
    if test is not None:
        tracking.log_report({f"final_test/{k}": v for k, v in test.scalars().items()}, None, None, step=epoch)
    tracking.log_figures({"plots/segmentation_contours.png": contour_figure(val.examples, f"validation, epoch {epoch} (selected)")})
    metric = cfg.segment.metric
    value = val.scalars()[metric.removeprefix("val_")]
    decision = segment_promotion.judge(cfg.tracking.model_name, val, dataset, dataset.fingerprint, metric, log)
    log(f"promotion: {decision.reason}")
    tracking.log_outcome("msmae.promotion", decision.reason, decision.to_dict(), "promotion.json")
    card = segmenter_card(cfg, dataset, val.scalars(), test.scalars() if test else None, epoch, prep, decision, init_checkpoint)
    tracking.log_text(card, "model_card.md")
    version = segment_registry.register_segmenter(segment_registry.SegmenterToRegister(
        model=model, preprocessing=prep, threshold=cfg.segment.threshold, selection_metric=metric, selection_value=value,
        dataset_fingerprint=dataset.fingerprint, step=epoch, card=card,
    ), cfg.tracking.model_name, decision.alias, {**segment_promotion.decision_tags(decision), **(version_tags or {})})
    return {"version": version, "alias": decision.alias, "why": decision.reason, "decision": decision, "val": val.scalars(),
            "test": test.scalars() if test else None}


def segmenter_card(cfg: RunConfig, dataset: IngestedDataset, val: dict, test: dict | None, epoch: int, prep: Preprocessing,
                   decision: Decision, init: str | None = None) -> str:
    """The model card (markdown) of a registered segmenter."""
    from pipelines.serve.model_card import NOT_FOR_DIAGNOSIS

    lines = [
        f"# {cfg.tracking.model_name}: lesion segmenter", "", NOT_FOR_DIAGNOSIS, "",
        "Input: an image (bytes, pixel array, or a path where the operator allows it). Output: the lesion mask at the input's size "
        "(uint8 array, 1 = lesion, and a 1-bit PNG).", "",
        f"- Model: {cfg.model.preset} ViT encoder at {prep.img_size} px + SETR progressive-upsampling head; encoder "
        f"{'initialised from ' + init if init else 'trained from scratch'}",
        f"- Data: {dataset.path} (fingerprint {dataset.fingerprint[:12]}), {dataset.split_size('train')} training images",
        f"- Loss: BCE + {cfg.segment.dice_weight:g} x soft Dice; threshold {cfg.segment.threshold:g}",
        f"- Selected on validation {cfg.segment.metric} at epoch {epoch} of {cfg.segment.epochs}",
        f"- Validation ({val['images']} images, each at its own size): Dice {val['dice']:.4f}, IoU {val['iou']:.4f}",
    ]
    if test:
        lines.append(f"- Test ({test['images']} images, evaluated once): Dice {test['dice']:.4f}, IoU {test['iou']:.4f}")
    lines += [f"- Preprocessing: {prep.to_dict()}", "", *segment_promotion.card_lines(decision)]
    return "\n".join(lines) + "\n"
