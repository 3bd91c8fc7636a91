"""One sweep trial: a Tune *function* trainable that runs the training pipeline's two Ray Train stages
(pre-training and fine-tuning, or, for a segmentation objective, pre-training and the segmentation stage).

Ray Train V2 does not run a ``TorchTrainer`` as a Tune trainable directly, so each trial is
a function that builds the trainers itself; ``TuneReportCallback`` forwards every fine-tuning
epoch's report to Tune, which is what ASHA stops weak trials on. Pre-training is not forwarded:
its metrics are those of the CLS head, not of the model the sweep selects.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipelines.config import SEGMENT_METRICS, RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.train.stages import StagesResult, best_checkpoint, train_stages
from tuning.space import run_overrides

TRIAL_TAG = "msmae.trial_id"
PARENT_TAG = "mlflow.parentRunId"
ERROR_TAG = "msmae.trial_error"  # what a trial raised; the driver sets its run's status


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled parameters (picklable, sent once to each trial)."""

    base: RunConfig  # the sweep's validated config; each trial applies its sampled values to it
    data_dir: str
    workdir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    objective: str
    fail_trial: int | None = None  # fault injection for tests: the trial with this index raises

    @property
    def tune_metric(self) -> str:
        """The running best of the objective, which the Ray Train worker reports every epoch."""
        return f"best_{self.objective}"


def trial_index(trial_id: str, trial_dir: str) -> int | None:
    """The trial's creation number, which Tune writes after the id in the trial's folder name
    (``run_trial_<id>_<n>_<params>``)."""
    match = re.search(rf"{re.escape(trial_id)}_(\d+)", Path(trial_dir).name)
    return int(match.group(1)) if match else None


def run_trial(config: dict, context: SweepContext) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    cfg = context.base.with_values(run_overrides(config), source=f"trial {trial_id}")
    client = MlflowClient(context.tracking_uri)
    run_id = _child_run(client, context, trial_id, config)
    try:
        if context.fail_trial is not None and trial_index(trial_id, tune.get_context().get_trial_dir()) == context.fail_trial:
            raise RuntimeError(f"injected failure of trial {trial_id} (fault-injection test)")
        if context.objective in SEGMENT_METRICS:
            result = segment_trial(cfg, context, trial_id, run_id, [TuneReportCallback()])
        else:
            result = train_stages(
                cfg, IngestedDataset.load(context.data_dir), Path(context.workdir) / "storage", f"{context.sweep_name}-{trial_id}",
                mlflow_uri=context.tracking_uri, mlflow_run_id=run_id, finetune_callbacks=[TuneReportCallback()],
            )
        client.log_metric(run_id, f"best_{context.objective}", result.best_score)
        client.set_terminated(run_id, "FINISHED")
    except Exception as error:
        record_trial_error(client, run_id, error)
        raise
    tune.report({
        context.tune_metric: result.best_score, "best_checkpoint": result.best_checkpoint, "pretrain_checkpoint": result.pretrain_checkpoint,
        "mlflow_run_id": run_id, "trial_finished": 1,
    })


def segment_trial(cfg: RunConfig, context: SweepContext, trial_id: str, run_id: str, callbacks: list) -> StagesResult:
    """A segmentation trial: pre-training with the trial's masking, then the segmentation stage from its checkpoint,
    whose epochs (``best_val_dice``) Tune sees; the encoder's pre-training masking ratios are what the sweep searches."""
    from pipelines.train.segment import run_segment_stage
    from pipelines.train.segment_worker import SegmentSpec

    dataset, storage, name = IngestedDataset.load(context.data_dir), Path(context.workdir) / "storage", f"{context.sweep_name}-{trial_id}"
    pretrained = train_stages(cfg, dataset, storage, name, stages=("pretrain",), mlflow_uri=context.tracking_uri, mlflow_run_id=run_id)
    spec = SegmentSpec(cfg, dataset.split_size("train"), pretrained.pretrain_checkpoint, context.tracking_uri, run_id)
    result = run_segment_stage(spec, dataset, storage, f"{name}-segment", callbacks=callbacks)
    best_dir, best = best_checkpoint(result, context.objective)
    return StagesResult(pretrained.pretrain_checkpoint, best_dir, best)


def record_trial_error(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """Tag a trial's run with the error it raised, and leave its status to the sweep driver.

    Only the driver knows why a trial ended: a trial ASHA stops can see the stop arrive as an
    exception (its Ray Train controller torn down under it), indistinguishable here from a crash.
    A trial that ended its own run FAILED raced the driver's verdict (``sweep.settle_child_runs``):
    checking first that the run was still RUNNING narrowed the window but could not close it (the
    sweep test once ended with two FAILED runs where one trial had been made to fail). So the driver
    is the one writer of a run's end state other than success; the tag keeps the error on the run
    meanwhile. Best effort: a tracking server that cannot take the tag must not hide the trial's
    own error, which Tune records either way."""
    try:
        client.set_tag(run_id, ERROR_TAG, f"{type(error).__name__}: {error}"[:500])
    except Exception as tag_error:  # noqa: BLE001 - the trial's error is the one to raise
        print(f"could not tag run {run_id} with the trial's error: {tag_error}", file=sys.stderr)


def _child_run(client: MlflowClient, context: SweepContext, trial_id: str, config: dict) -> str:
    """This trial's MLflow run under the sweep's parent run; a resumed sweep reuses it."""
    existing = client.search_runs(
        [context.experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{context.parent_run_id}'",
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(context.experiment_id, run_name=trial_id, tags={PARENT_TAG: context.parent_run_id, TRIAL_TAG: trial_id})
    from mlflow.entities import Param

    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])
    return run.info.run_id
