"""``msmae run``: ingest → pre-train → fine-tune → evaluate → register, one command.

Everything a run writes lives in one working folder: the ingested data, Ray Train's
checkpoints (``storage/``), the MLflow SQLite store and artifacts, and ``last_run.json``
which ``--resume`` reads to continue the same run from its last checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from pipelines.config import RunConfig
from pipelines.evaluate import evaluate_split, format_report, load_classifier
from pipelines.train import class_names, dataset_info, ensure_ray, run_stage, split_size
from pipelines.worker import Stage, StageSpec

STATE_NAME = "last_run.json"


@dataclass
class RunOutcome:
    run_name: str
    mlflow_run_id: str
    pretrain_checkpoint: str | None
    model_version: str | None  # None when the run stopped after pre-training
    champion: bool
    val: dict | None
    test: dict | None
    seconds: float


def prepare_data(source: Path, cfg: RunConfig, workdir: Path, log=print) -> Path:
    """An ingested folder as is, or a raw ImageFolder ingested into ``workdir/data``."""
    if (source / "dataset.json").is_file():
        return source
    from pipelines.ingest import IngestOptions, ingest

    out = workdir / "data"
    opts = IngestOptions(val=cfg.data.val_fraction, test=cfg.data.test_fraction, seed=cfg.data.seed)
    result = ingest(source, out, opts, progress=True, log=log)
    summary = result.summary
    log(f"ingest: {summary['num_images']} images, {summary['quarantined']} quarantined, "
        f"{summary['duplicate_groups']} duplicate groups -> {out}")
    return out


def _run_state(workdir: Path, resume: bool, prefix: str = "run") -> dict:
    """The run's name and MLflow id; ``--resume`` reads them back so Ray restores the same run."""
    state_file = workdir / STATE_NAME
    if resume:
        if not state_file.is_file():
            raise FileNotFoundError(f"--resume: no earlier run in {workdir} (missing {state_file.name})")
        return json.loads(state_file.read_text())
    return {"run_name": time.strftime(f"{prefix}-%Y%m%d-%H%M%S")}


def _save_state(workdir: Path, state: dict) -> None:
    (workdir / STATE_NAME).write_text(json.dumps(state))


def run_pipeline(
    source: Path, cfg: RunConfig, workdir: Path, tracking_uri: str, resume: bool = False,
    fail_at_epoch: int | None = None, log=print, stages: tuple[Stage, ...] = ("pretrain", "finetune"),
    init_checkpoint: str | None = None,
) -> RunOutcome:
    """Run the given stages under one MLflow run; ``msmae pretrain`` / ``finetune`` / ``run`` differ only in ``stages``.

    Fine-tuning starts from ``init_checkpoint`` (a pre-training checkpoint folder) when given,
    from this run's own pre-training otherwise, and from random weights when neither exists
    (a supervised ViT trained from scratch).
    """
    start = time.time()
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = _run_state(workdir, resume, prefix="-".join(stages))
    data_dir = prepare_data(source, cfg, workdir, log)
    info = dataset_info(data_dir)
    names = class_names(info)
    ensure_ray()

    set_experiment(tracking_uri, cfg.tracking.experiment, workdir)
    with mlflow.start_run(run_id=state.get("mlflow_run_id"), run_name=state["run_name"]) as run:
        state["mlflow_run_id"] = run.info.run_id
        _save_state(workdir, state)
        if not resume:
            from pipelines.tracking import log_params

            log_params(cfg.flat())
            mlflow.log_dict(cfg.model_dump(), "config.yaml")
            mlflow.log_artifact(str(data_dir / "dataset.json"))
            mlflow.set_tags({"msmae.stages": ",".join(stages), "msmae.init_checkpoint": init_checkpoint or ""})
        log("resolved configuration:\n" + yaml.safe_dump(cfg.model_dump(), sort_keys=False))

        common = dict(
            config=cfg.model_dump(), num_classes=len(names), num_train=split_size(info, "train"),
            class_names=names, mlflow_uri=tracking_uri, mlflow_run_id=run.info.run_id,
        )
        storage = workdir / "storage"
        if "pretrain" in stages:
            pre = run_stage(StageSpec("pretrain", fail_at_epoch=fail_at_epoch, **common), cfg, data_dir, storage, f"{state['run_name']}-pretrain")
            init_checkpoint = state["pretrain_checkpoint"] = pre.checkpoint.path
            _save_state(workdir, state)
            log(f"pre-training checkpoint: {init_checkpoint}")
        if "finetune" not in stages:
            log(f"fine-tune it with:\n  msmae finetune {source} --init {init_checkpoint} --config <preset> --workdir {workdir}")
            return RunOutcome(state["run_name"], run.info.run_id, init_checkpoint, None, False, None, None, time.time() - start)
        if init_checkpoint is None:
            log("no pre-training checkpoint: fine-tuning starts from random weights (a supervised ViT from scratch)")
        fail_in_finetune = fail_at_epoch if stages == ("finetune",) else None
        fine = run_stage(
            StageSpec("finetune", init_checkpoint=init_checkpoint, fail_at_epoch=fail_in_finetune, **common),
            cfg, data_dir, storage, f"{state['run_name']}-finetune",
        )
        best_dir, _ = best_checkpoint(fine, cfg.checkpoint.metric)
        version, champion, val, test = evaluate_and_register(best_dir, init_checkpoint, data_dir, info, cfg, names, log)
    seconds = time.time() - start
    log(f"registered {cfg.tracking.model_name} version {version}" + (" as @champion" if champion else " (champion kept)"))
    log(f"done in {seconds:.0f} s. Open the MLflow UI with:\n  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return RunOutcome(state["run_name"], run.info.run_id, init_checkpoint, version, champion, val.scalars(), test.scalars() if test else None, seconds)


def set_experiment(tracking_uri: str, experiment: str, workdir: Path) -> None:
    """Select (creating if needed) the experiment; with SQLite its artifacts live in ``workdir``."""
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = (workdir / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)


def evaluate_and_register(
    best_dir: str, pretrain_checkpoint: str | None, data_dir: Path, info: dict, cfg: RunConfig, names: list[str], log,
    version_tags: dict[str, str] | None = None,
):
    """The chosen fine-tuning checkpoint → final report, figures, test once, registry (in the active MLflow run)."""
    import torch

    from pipelines.tracking import register_model

    model, _ = load_classifier(best_dir)
    val, val_probs, val_labels = evaluate_split(model, data_dir, "val", cfg.data.img_size)
    log(format_report(val, names, f"validation (model chosen on validation {cfg.checkpoint.metric})"))
    mlflow.log_metrics(val.scalars("final_val/"))
    mlflow.log_dict({"class_names": names, **val.__dict__}, "final_val_report.json")
    log_figures(model, pretrain_checkpoint, data_dir, cfg, names, val, val_probs, val_labels)
    test = None
    if split_size(info, "test"):
        test, _, _ = evaluate_split(model, data_dir, "test", cfg.data.img_size)  # once, at the end
        log(format_report(test, names, "test (evaluated once, after selection)"))
        mlflow.log_metrics(test.scalars("final_test/"))
    example = torch.zeros(1, 3, cfg.data.img_size, cfg.data.img_size)
    version, champion = register_model(
        model, cfg.tracking.model_name, names, cfg.checkpoint.metric,
        getattr(val, cfg.checkpoint.metric.removeprefix("val_")), info.get("fingerprint", ""), example, version_tags,
    )
    return version, champion, val, test


def log_figures(model, pretrain_checkpoint: str | None, data_dir: Path, cfg: RunConfig, names: list[str], report, probs, labels) -> None:
    """Confusion matrix, ROC curves, attention overlays and masked reconstructions on validation images."""
    import matplotlib.pyplot as plt
    import torch

    import msmae
    from pipelines import plots
    from pipelines.data import eval_stream
    from pipelines.worker import STATE_FILE

    figures = {
        "plots/confusion_matrix.png": plots.confusion_figure(report.confusion, names),
        "plots/roc_curves.png": plots.roc_figure(probs, labels, names, report.per_class_auc),
    }
    sample = eval_stream(data_dir, "val", cfg.data.img_size).take_batch(8)
    images = torch.as_tensor(sample["image"])
    titles = [names[int(label)] for label in sample["label"]]
    figures["plots/attention_overlays.png"] = plots.attention_figure(model.cpu(), images, titles)
    if pretrain_checkpoint is not None:  # fine-tuning from scratch has no decoder to show
        state = torch.load(Path(pretrain_checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)
        pretrain = msmae.build_pretrain_model(msmae.ViTPreset(**state["preset"]), state["num_classes"])
        pretrain.load_state_dict(state["model"])
        masking = cfg.pretrain.masking
        figures["plots/reconstructions.png"] = plots.reconstruction_figure(pretrain, images, masking.mask_ratio, masking.throw_ratio)
    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)


def best_checkpoint(result, metric: str) -> tuple[str, float]:
    """The fine-tuning checkpoint with the best validation metric, and that metric's value.

    Ray keeps the ``checkpoint.keep`` best by score, plus always the latest (for resuming).
    """
    candidates = [(m.get(metric, float("-inf")), c.path) for c, m in (result.best_checkpoints or [])]
    if not candidates:
        return result.checkpoint.path, float("nan")
    score, path = max(candidates)
    return path, score
