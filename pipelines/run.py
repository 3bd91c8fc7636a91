"""``msmae run``: ingest → pre-train → fine-tune → evaluate → register, one command.

Everything a run writes lives in one working folder: the ingested data, Ray Train's
checkpoints (``storage/``), the MLflow SQLite store and artifacts, and ``last_run.json``
which ``--resume`` reads to continue the same run from its last checkpoints.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipelines import tracking
from pipelines.config import RunConfig
from pipelines.dataset import IngestedDataset
from pipelines.local_ray import ensure_ray
from pipelines.report import evaluate_and_register
from pipelines.stages import train_stages
from pipelines.worker import Stage

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


def prepare_data(source: Path, cfg: RunConfig, workdir: Path, log: Callable[[str], None] = print) -> IngestedDataset:
    """An ingested folder as is, or a raw ImageFolder ingested into ``workdir/data``."""
    if IngestedDataset.is_ingested(source):
        return IngestedDataset.load(source)
    from pipelines.ingest import IngestOptions, ingest

    out = workdir / "data"
    opts = IngestOptions(val=cfg.data.val_fraction, test=cfg.data.test_fraction, seed=cfg.data.seed)
    summary = ingest(source, out, opts, progress=True, log=log).summary
    log(f"ingest: {summary['num_images']} images, {summary['quarantined']} quarantined, "
        f"{summary['duplicate_groups']} duplicate groups -> {out}")
    return IngestedDataset.load(out)


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
    fail_at_epoch: int | None = None, log: Callable[[str], None] = print, stages: tuple[Stage, ...] = ("pretrain", "finetune"),
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
    dataset = prepare_data(source, cfg, workdir, log)
    ensure_ray()

    tracking.set_experiment(tracking_uri, cfg.tracking.experiment, workdir)
    with tracking.active_run(state.get("mlflow_run_id"), state["run_name"]) as run:
        state["mlflow_run_id"] = run.info.run_id
        _save_state(workdir, state)
        if not resume:
            tracking.log_run_inputs(
                cfg.model_dump(), cfg.flat(), dataset.summary_file,
                {"msmae.stages": ",".join(stages), "msmae.init_checkpoint": init_checkpoint or ""},
            )
        log("resolved configuration:\n" + yaml.safe_dump(cfg.model_dump(), sort_keys=False))

        def pretrained(path: str) -> None:
            state["pretrain_checkpoint"] = path
            _save_state(workdir, state)
            log(f"pre-training checkpoint: {path}")

        result = train_stages(
            cfg, dataset, workdir / "storage", state["run_name"], stages=stages, init_checkpoint=init_checkpoint,
            mlflow_uri=tracking_uri, mlflow_run_id=run.info.run_id, on_pretrained=pretrained, fail_at_epoch=fail_at_epoch, log=log,
        )
        if result.best_checkpoint is None:
            log(f"fine-tune it with:\n  msmae finetune {source} --init {result.pretrain_checkpoint} --config <preset> --workdir {workdir}")
            return RunOutcome(state["run_name"], run.info.run_id, result.pretrain_checkpoint, None, False, None, None, time.time() - start)
        final = evaluate_and_register(result.best_checkpoint, result.pretrain_checkpoint, dataset, cfg, log)
    seconds = time.time() - start
    log(f"registered {cfg.tracking.model_name} version {final.version}" + (" as @champion" if final.champion else " (champion kept)"))
    log(f"done in {seconds:.0f} s. Open the MLflow UI with:\n  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
    return RunOutcome(
        state["run_name"], run.info.run_id, result.pretrain_checkpoint, final.version, final.champion,
        final.val.scalars(), final.test.scalars() if final.test else None, seconds,
    )
