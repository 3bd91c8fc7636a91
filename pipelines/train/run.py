"""``msmae run``: ingest → pre-train → fine-tune → evaluate → register, one command.

Everything a run writes lives in one working folder: the ingested data, Ray Train's
checkpoints (``storage/``), the MLflow SQLite store and artifacts, and ``last_run.json``
which ``--resume`` reads to continue the same run from its last checkpoints (and which says
when the run finished, so resuming a finished run registers nothing a second time).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import tracking
from pipelines.config import RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.data.ingest_options import IngestError, IngestOptionError
from pipelines.local_ray import ensure_ray
from pipelines.redact import mask_uri
from pipelines.serve import registry
from pipelines.train import health, summary
from pipelines.train.finish import FinalReport, evaluate_and_register
from pipelines.train.stages import train_stages
from pipelines.train.worker import Stage

STATE_NAME = "last_run.json"
LOCK_NAME = "run.lock"


class ResumeError(RuntimeError):
    """``--resume`` found nothing to continue (a usage error: start a new run instead)."""


class WorkdirBusy(RuntimeError):
    """Another msmae command holds the working folder (a usage error: wait, or use another --workdir)."""


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
    already_finished: bool = False  # --resume of a run that had finished: nothing was done
    model_name: str | None = None
    alias: str | None = None  # champion / challenger / None (not promoted)
    decision: str | None = None  # why, in one line
    warnings: list[str] | None = None  # health warnings (also the run's msmae.health tag and health.json)
    summary: list[str] | None = None  # the end-of-run summary as printed


def prepare_data(source: Path, cfg: RunConfig, workdir: Path, log: Callable[[str], None] = print,
                 stages: tuple[Stage, ...] = ("pretrain", "finetune")) -> IngestedDataset:
    """An ingested folder as is, or a raw ImageFolder ingested into ``workdir/data``; checked for training."""
    if IngestedDataset.is_ingested(source):
        dataset = IngestedDataset.load(source)
    else:
        import sys

        from pipelines.data.ingest import IngestOptions, class_count_lines, ingest

        out = workdir / "data"
        opts = IngestOptions(val=cfg.data.val_fraction, test=cfg.data.test_fraction, seed=cfg.data.seed)
        dataset = ingest(source, out, opts, progress=sys.stderr.isatty(), log=log).dataset
        summary = dataset.summary
        left_out = summary.get("excluded", {}).get("mask_like", 0)
        log(f"ingest: {summary['num_images']} images, {summary['quarantined']} quarantined, {left_out} mask-like left out, "
            f"{summary['duplicate_groups']} duplicate groups, {summary['near_duplicates']['images']} near-copies held with their copies -> {out}")
        for line in class_count_lines(summary):
            log(line)
    check_trainable(dataset, cfg, stages)
    return dataset


def check_trainable(dataset: IngestedDataset, cfg: RunConfig | None = None, stages: tuple[Stage, ...] = ("pretrain", "finetune")) -> None:
    """What a Ray worker would trip over minutes later (after retries), checked before Ray starts."""
    if dataset.num_classes < 2:
        raise IngestError(f"{dataset.path} has {dataset.num_classes} class(es); a classifier needs at least 2")
    for split in ("train", "val"):
        if not dataset.split_size(split):
            raise IngestError(f"{dataset.path}: the {split} split is empty; ingest more images or another --val")
    if cfg is None:
        return
    num_train = dataset.split_size("train")
    for stage in stages:
        batch = (cfg.pretrain if stage == "pretrain" else cfg.finetune).batch_size
        per_step = max(1, batch // cfg.scaling.workers) * cfg.scaling.workers  # what the workers take per step, together
        if num_train < per_step:
            raise IngestError(
                f"{dataset.path}: the train split has {num_train} images, fewer than one {stage} batch ({per_step} over "
                f"{cfg.scaling.workers} workers), so no step would run; lower {stage}.batch_size (e.g. --set "
                f"{stage}.batch_size={max(1, num_train // 2)}) or ingest more images")


def _config_line(cfg: RunConfig, stages: tuple[Stage, ...]) -> str:
    """The few settings that say what a run will do, in one line."""
    parts = [f"{cfg.model.preset} ViT at {cfg.data.img_size} px"]
    for stage in stages:
        stage_cfg = cfg.pretrain if stage == "pretrain" else cfg.finetune
        parts.append(f"{stage} {stage_cfg.epochs} epochs ({stage_cfg.masking.strategy} masking)")
    parts.append(f"{cfg.scaling.workers} {'GPU' if cfg.scaling.use_gpu else 'CPU'} workers")
    return ", ".join(parts)


def run_prefix(dataset: IngestedDataset, config_name: str, stages: tuple[Stage, ...]) -> str:
    """``btmd-demo-pretrain-finetune``: which data, which configuration, which stages (the time follows)."""
    import re

    data = registry.default_name(dataset.summary, dataset.path).removeprefix("msmae-")
    config = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(config_name).stem if config_name.endswith((".yaml", ".yml")) else config_name)
    return "-".join([data, config.strip("-") or "config", *stages])


def _run_state(workdir: Path, resume: bool, prefix: str, log: Callable[[str], None]) -> dict:
    """The run's name and MLflow id; ``--resume`` reads them back so Ray restores the same run."""
    state_file = workdir / STATE_NAME
    if resume:
        if not state_file.is_file():
            raise ResumeError(f"--resume: no earlier run in {workdir} (no {STATE_NAME}); start one without --resume")
        return _read_state(state_file)
    if state_file.is_file():
        earlier = _read_state(state_file, strict=False)
        if earlier and not earlier.get("finished"):
            log(f"note: run {earlier.get('run_name')} in {workdir} did not finish; starting a new run "
                "(`--resume` continues the last one instead)")
    return {"run_name": time.strftime(f"{prefix}-%Y%m%d-%H%M%S")}


def _read_state(state_file: Path, strict: bool = True) -> dict:
    try:
        state = json.loads(state_file.read_text())
        if isinstance(state, dict) and "run_name" in state:
            return state
    except (OSError, ValueError):
        pass
    if strict:
        raise ResumeError(f"--resume: {state_file} is damaged; start a new run without --resume")
    return {}


def _save_state(workdir: Path, state: dict) -> None:
    from pipelines.outputs import write_atomic

    write_atomic(workdir / STATE_NAME, json.dumps(state).encode())


def _already_finished(state: dict, workdir: Path, log: Callable[[str], None]) -> RunOutcome:
    """``--resume`` of a finished run: say so and do nothing (registering the same weights again would add a version)."""
    version = state.get("model_version")
    done = f"registered {state.get('model_name', 'the model')} version {version}" if version else "pre-training only"
    log(f"run {state['run_name']} in {workdir} already finished ({done}): nothing to resume, nothing registered again; "
        "start a new run without --resume")
    return RunOutcome(state["run_name"], state.get("mlflow_run_id", ""), state.get("pretrain_checkpoint"), version,
                      bool(state.get("champion")), None, None, 0.0, already_finished=True)


def run_pipeline(
    source: Path, cfg: RunConfig, workdir: Path, tracking_uri: str, resume: bool = False,
    fail_at_epoch: int | None = None, log: Callable[[str], None] = print, stages: tuple[Stage, ...] = ("pretrain", "finetune"),
    init_checkpoint: str | None = None, show_config: bool = False, config_name: str = "config",
) -> RunOutcome:
    """Run the given stages under one MLflow run; ``msmae pretrain`` / ``finetune`` / ``run`` differ only in ``stages``.

    ``config_name`` (the preset or YAML file) goes into the run's name with the dataset's. The
    registered model's name and the experiment default to ``msmae-<dataset>``. The last lines
    printed are the summary block (``pipelines.train.summary``).

    Fine-tuning starts from ``init_checkpoint`` (a pre-training checkpoint folder) when given,
    from this run's own pre-training otherwise, and from random weights when neither exists
    (a supervised ViT trained from scratch). ``show_config``: print the whole resolved
    configuration (``--verbose``); otherwise one line says where it is kept.
    """
    start = time.time()
    workdir = workdir.resolve()
    check_workdir(source, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        return _run_locked(source, cfg, workdir, tracking_uri, resume, fail_at_epoch, log, stages, init_checkpoint, start, show_config, config_name)


def check_workdir(source: Path, workdir: Path) -> None:
    """A raw source is ingested into ``workdir/data``: a workdir inside the source (or holding it) is refused
    before anything is made, so no folder appears among the user's images."""
    if IngestedDataset.is_ingested(source):
        return
    src = source.resolve()
    if workdir == src or workdir.is_relative_to(src) or src.is_relative_to(workdir):
        raise IngestOptionError(f"--workdir {workdir} overlaps --data {src}; choose a --workdir outside the images (e.g. beside them)")


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """One run per working folder at a time: a second one would train beside the first and overwrite its resume state.

    An advisory ``flock`` on ``workdir/run.lock``, released by the kernel when the process ends, however it ends."""
    path = workdir / LOCK_NAME
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise WorkdirBusy(f"--workdir {workdir} is in use by a running msmae command ({holder}); wait for it to finish, "
                          "or choose another --workdir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        handle.close()


def _run_locked(
    source: Path, cfg: RunConfig, workdir: Path, tracking_uri: str, resume: bool, fail_at_epoch: int | None,
    log: Callable[[str], None], stages: tuple[Stage, ...], init_checkpoint: str | None, start: float, show_config: bool = False,
    config_name: str = "config",
) -> RunOutcome:
    state = _run_state(workdir, True, "", log) if resume else None
    if state and state.get("finished"):
        return _already_finished(state, workdir, log)
    dataset = prepare_data(source, cfg, workdir, log, stages)
    cfg = registry.with_default_names(cfg, dataset.summary, dataset.path)
    if state is None:
        state = _run_state(workdir, False, run_prefix(dataset, config_name, stages), log)
    ensure_ray(scaling=cfg.scaling)

    tracking.set_experiment(tracking_uri, cfg.tracking.experiment, workdir)
    final: FinalReport | None = None
    with tracking.active_run(state.get("mlflow_run_id"), state["run_name"]) as run:
        state["mlflow_run_id"] = run.info.run_id
        _save_state(workdir, state)
        if not resume:
            tracking.log_run_inputs(
                cfg.public_dump(), cfg.flat(), dataset.summary_file,
                {"msmae.stages": ",".join(stages), "msmae.init_checkpoint": init_checkpoint or ""},
            )
        if show_config:
            log("resolved configuration:\n" + yaml.safe_dump(cfg.public_dump(), sort_keys=False))
        else:
            log(f"configuration: {_config_line(cfg, stages)}; the whole resolved configuration is config.yaml of MLflow run "
                f"{run.info.run_id} (--verbose prints it)")

        def pretrained(path: str) -> None:
            state["pretrain_checkpoint"] = path
            _save_state(workdir, state)
            log(f"pre-training checkpoint: {path}")

        result = train_stages(
            cfg, dataset, workdir / "storage", state["run_name"], stages=stages, init_checkpoint=init_checkpoint,
            mlflow_uri=tracking_uri, mlflow_run_id=run.info.run_id, on_pretrained=pretrained, fail_at_epoch=fail_at_epoch, log=log,
        )
        if result.best_checkpoint is not None:
            final = evaluate_and_register(result.best_checkpoint, result.pretrain_checkpoint, dataset, cfg, log)
        warnings = _health_and_curves(tracking_uri, run.info.run_id, dataset, cfg, stages, final)
        state.update(finished=True, model_name=cfg.tracking.model_name)
        if final is not None:
            state.update(model_version=final.version, champion=final.champion, alias=final.alias)
        _save_state(workdir, state)
    seconds = time.time() - start
    if final is None:
        log(f"fine-tune it with:\n  msmae finetune {source} --init {result.pretrain_checkpoint} --config <preset> --workdir {workdir}")
    else:
        log(f"registered {final.model_name} version {final.version}" + (f" as @{final.alias}" if final.alias else " (no alias)"))
    log(f"done in {seconds:.0f} s. Open the MLflow UI with:\n  .venv/bin/mlflow ui --backend-store-uri {mask_uri(tracking_uri)} --host 127.0.0.1 --port 5000")
    lines = summary.summary_lines(summary.RunSummary(
        run_name=state["run_name"], run_id=run.info.run_id, experiment=cfg.tracking.experiment, experiment_id=run.info.experiment_id,
        tracking_uri=tracking_uri, artifacts=run.info.artifact_uri, pretrain_checkpoint=result.pretrain_checkpoint,
        checkpoint=result.best_checkpoint, model_name=final.model_name if final else None, version=final.version if final else None,
        alias=final.alias if final else None, decision=final.decision.reason if final and final.decision else None,
        warnings=[w.message for w in warnings],
    ))
    for line in lines:
        log(line)
    return RunOutcome(
        state["run_name"], run.info.run_id, result.pretrain_checkpoint, final.version if final else None, bool(final and final.champion),
        final.val.scalars() if final else None, final.test.scalars() if final and final.test else None, seconds,
        model_name=cfg.tracking.model_name, alias=final.alias if final else None,
        decision=final.decision.reason if final and final.decision else None, warnings=[w.message for w in warnings], summary=lines,
    )


def _health_and_curves(tracking_uri: str, run_id: str, dataset: IngestedDataset, cfg: RunConfig, stages: tuple[Stage, ...],
                       final: FinalReport | None) -> list[health.HealthWarning]:
    """The run's health warnings (tag ``msmae.health``, ``health.json``) and ``plots/training_curves.png``, from its own metrics."""
    from pipelines.train import plots

    metric = cfg.checkpoint.metric
    keys = [*health.HEALTH_KEYS, *(f"{s}/{k}" for s in ("pretrain", "finetune") for k in ("train_loss", metric))]
    histories = tracking.metric_histories(tracking_uri, run_id, sorted(set(keys)))
    choice = final.calibration if final else None
    warnings = health.run_health(
        histories, dataset.num_classes, dataset.class_counts("train"), dataset.class_names,
        {s: (cfg.pretrain if s == "pretrain" else cfg.finetune).class_weights for s in stages},
        (choice.applied, choice.ece_before, choice.ece_fitted, choice.fitted) if choice else None,
    )
    tracking.log_outcome("msmae.health", "; ".join(w.code for w in warnings) or "ok",
                         [{"code": w.code, "message": w.message} for w in warnings], "health.json")
    tracking.log_figures({"plots/training_curves.png": plots.training_curves_figure(histories, metric)})
    return warnings
