"""``msmae tune``: an Optuna (TPE) search with ASHA early stopping over training runs, on Ray Tune.

A sweep lives in one working folder: ``sweep.json`` (its name and MLflow parent run, read by
``--resume``), Tune's experiment state under ``tune/``, every trial's Ray Train checkpoints
under ``storage/``, and the Optuna study in ``optuna.db`` (SQLite), so a resumed sweep keeps
both Tune's finished trials and Optuna's history. The best trial's model is evaluated,
registered and made ``champion`` when it beats the current one on the same validation split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from joblib import cpu_count

from pipelines.config import RunConfig
from pipelines.local_ray import ensure_ray
from pipelines.outputs import write_atomic
from pipelines.serve.registry import default_name as registry_default_name
from pipelines.serve.registry import with_default_names
from pipelines.train.finish import evaluate_and_register
from pipelines.train.run import prepare_data
from pipelines.tracking import active_run, log_params, resolve_tracking_uri, set_experiment
from tuning.space import SearchSpace, check_space, load_space, run_overrides
from tuning.summary import log_summary, trial_rows
from tuning.trial import PARENT_TAG, TRIAL_TAG, SweepContext, run_trial

STATE_NAME = "sweep.json"
TRIAL_CPU = 0.1  # the trial function itself only waits on its trainers; Tune refuses 0
DATA_CPUS_PER_TRIAL = 1  # Ray Data's decode tasks need a free CPU slot beside the workers, or trials hang


@dataclass(frozen=True)
class SweepRequest:
    data: Path
    space: Path
    trials: int
    config: RunConfig  # validated at the command line's edge (preset + --set)
    preset: str = "demo"  # the preset's name, recorded with the sweep
    workdir: Path = Path("msmae-sweep")
    tracking_uri: str | None = None
    max_concurrent: int | None = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    seed: int = 0
    resume: bool = False
    fail_trial: int | None = None


@dataclass
class SweepOutcome:
    sweep_name: str
    parent_run_id: str
    rows: list[dict]
    best: dict | None
    model_version: str | None
    champion: bool
    seconds: float


def sweep_base_config(request: SweepRequest, space: SearchSpace) -> RunConfig:
    """The request's config with the per-trial resources and the selection metric applied."""
    return request.config.with_values({
        "scaling.workers": request.workers_per_trial,
        "scaling.cpus_per_worker": request.cpus_per_worker,
        "scaling.use_gpu": request.gpus_per_worker > 0,
        "segment.metric" if space.task == "segmentation" else "checkpoint.metric": space.objective,
    }, source="the sweep's resources")


def default_concurrency(resources: dict, request: SweepRequest) -> int:
    """As many trials as the cluster holds right now, counting each trial's own and Ray Data's CPUs."""
    per_trial_cpu = request.workers_per_trial * request.cpus_per_worker + DATA_CPUS_PER_TRIAL + TRIAL_CPU
    limit = math.floor(resources.get("CPU", 0) / per_trial_cpu)
    if request.gpus_per_worker > 0:
        limit = min(limit, math.floor(resources.get("GPU", 0) / (request.workers_per_trial * request.gpus_per_worker)))
    return max(1, limit)


def local_cpus(request: SweepRequest) -> int:
    """Logical CPUs for a local Ray: enough slots for the requested concurrency (never a deadlock)."""
    cores = cpu_count()
    wanted = request.max_concurrent or max(1, cores // max(1, request.workers_per_trial))
    per_trial = request.workers_per_trial * request.cpus_per_worker + DATA_CPUS_PER_TRIAL + TRIAL_CPU
    return max(4, 2 * cores, math.ceil(wanted * per_trial) + 1)


def run_sweep(request: SweepRequest, log=print) -> SweepOutcome:
    """Run (or resume) the sweep; ``outcome.best`` is None when no trial finished (the command then exits 1)."""
    from ray import tune

    start = time.time()
    space = load_space(request.space)  # every check first: nothing is written, ingested or started for a bad request
    cfg = check_space(space, sweep_base_config(request, space))
    workdir = request.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    state = _sweep_state(workdir, request.resume)
    dataset = prepare_data(request.data, cfg, workdir, log, stages=("pretrain",) if space.task == "segmentation" else ("pretrain", "finetune"))
    if space.task == "segmentation":
        from pipelines.serve.segment_registry import default_name as segmenter_name
        from pipelines.train.segment import check_segmentable

        check_segmentable(dataset, cfg)
        if cfg.tracking.model_name is None:  # a segmenter never takes the dataset's classifier @champion
            cfg = cfg.with_values({"tracking.model_name": segmenter_name(registry_default_name(dataset.summary, dataset.path))})
    cfg = with_default_names(cfg, dataset.summary, dataset.path)  # msmae-<dataset> where the user named none
    ensure_ray(num_cpus=local_cpus(request))
    import ray

    concurrency = request.max_concurrent or default_concurrency(ray.cluster_resources(), request)
    tracking_uri = resolve_tracking_uri(request.tracking_uri, workdir)
    set_experiment(tracking_uri, cfg.tracking.experiment, workdir)
    with active_run(state.get("parent_run_id"), state["sweep_name"]) as parent:
        state["parent_run_id"] = parent.info.run_id
        write_atomic(workdir / STATE_NAME, json.dumps(state).encode())  # --resume reads it: never half written
        if not request.resume:
            log_params({"sweep.trials": request.trials, "sweep.max_concurrent": concurrency, "sweep.space": str(request.space),
                        "sweep.objective": space.objective, "sweep.seed": request.seed, "sweep.preset": request.preset,
                        "sweep.workers_per_trial": request.workers_per_trial, "sweep.gpus_per_worker": request.gpus_per_worker})
            mlflow.log_artifact(str(request.space), "sweep")
        context = SweepContext(
            cfg, str(dataset.path), str(workdir), tracking_uri, parent.info.experiment_id,
            parent.info.run_id, state["sweep_name"], space.objective, request.fail_trial,
        )
        trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"cpu": TRIAL_CPU})
        log(f"sweep {state['sweep_name']}: {request.trials} trials, {concurrency} at a time, "
            f"{request.workers_per_trial} worker(s) each; objective {space.objective} (max)")
        tuner = _tuner(request, space, cfg, trainable, context, workdir, concurrency)
        results = tuner.fit()
        rows = trial_rows(results, context.tune_metric)
        settle_child_runs(tracking_uri, parent.info.experiment_id, parent.info.run_id, rows)
        orphans = fail_orphan_trials(workdir / "optuna.db", state["sweep_name"])
        if orphans:
            log(f"{orphans} Optuna trial(s) an interrupted driver had asked for but never started: marked FAILED in the study")
        log_summary(rows, space, workdir / "optuna.db", state["sweep_name"], log)
        best = max((r for r in rows if r["status"] != "error" and r.get("best_checkpoint")), key=lambda r: r["objective"], default=None)
        version, champion = None, False
        if best is not None:
            best_cfg = cfg.with_values(run_overrides(best["params"]), source=f"trial {best['trial_id']}")
            mlflow.log_metric(f"sweep_best_{space.objective}", best["objective"])
            mlflow.set_tag("sweep.best_trial", best["trial_id"])
            tags = {f"param.{k}": str(v) for k, v in best["params"].items()} | {"sweep": state["sweep_name"], "trial": best["trial_id"]}
            if space.task == "segmentation":
                from pipelines.train.segment import finish_segmentation

                done = finish_segmentation(best["best_checkpoint"], dataset, best_cfg, log, best["pretrain_checkpoint"], version_tags=tags)
                version, champion, alias, why = done["version"], done["alias"] == "champion", done["alias"], done["why"]
            else:
                final = evaluate_and_register(best["best_checkpoint"], best["pretrain_checkpoint"], dataset, best_cfg, log, version_tags=tags)
                version, champion, alias, why = final.version, final.champion, final.alias, final.decision.reason
            log(f"best trial {best['trial_id']}: {space.objective} {best['objective']:.4f} → {cfg.tracking.model_name} "
                f"version {version}" + (f" @{alias}" if alias else " (no alias)") + f"; {why}")
        else:
            log("no trial finished: nothing registered")
    return SweepOutcome(state["sweep_name"], parent.info.run_id, rows, best, version, champion, time.time() - start)


def _sweep_state(workdir: Path, resume: bool) -> dict:
    state_file = workdir / STATE_NAME
    if resume:
        if not state_file.is_file():
            raise FileNotFoundError(f"--resume: no earlier sweep in {workdir} (missing {STATE_NAME})")
        return json.loads(state_file.read_text())
    if state_file.is_file():
        raise FileExistsError(f"{workdir} already holds sweep {json.loads(state_file.read_text())['sweep_name']}: "
                              "pass --resume to continue it, or choose another --workdir")
    return {"sweep_name": time.strftime("sweep-%Y%m%d-%H%M%S")}


def _tuner(request: SweepRequest, space: SearchSpace, cfg, trainable, context: SweepContext, workdir: Path, concurrency: int):
    """A new Tuner, or the interrupted one restored (finished trials and searcher state kept)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    experiment = workdir / "tune" / context.sweep_name
    epochs = cfg.segment.epochs if space.task == "segmentation" else cfg.finetune.epochs  # the stage Tune sees, epoch by epoch
    if request.resume and tune.Tuner.can_restore(str(experiment)):
        return tune.Tuner.restore(str(experiment), trainable, resume_errored=False, restart_errored=False)
    searcher = OptunaSearch(
        space.define_by_run(), metric=context.tune_metric, mode="max", sampler=optuna.samplers.TPESampler(seed=request.seed),
        study_name=context.sweep_name, storage=optuna.storages.RDBStorage(f"sqlite:///{workdir / 'optuna.db'}"),
    )
    scheduler = ASHAScheduler(
        time_attr="training_iteration", metric=context.tune_metric, mode="max",
        max_t=epochs + 1, grace_period=min(space.grace_period, epochs), reduction_factor=space.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=concurrency), scheduler=scheduler, num_samples=request.trials,
        ),
        run_config=tune.RunConfig(
            name=context.sweep_name, storage_path=str(workdir / "tune"),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),  # a crashed trial is recorded; the sweep goes on
            verbose=1,
        ),
    )


def fail_orphan_trials(optuna_db: Path, study_name: str) -> int:
    """Mark FAILED the study's trials still RUNNING once Tune has finished; returns how many.

    A driver killed between Optuna's ``ask`` and Tune's start of the trial leaves it RUNNING in the
    study for good: it never trains and Tune never reports on it. Left so, it reads as work in progress
    in Optuna's dashboard and in ``study.trials`` (the sweep summary, anyone auditing the study)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{optuna_db}")
    orphans = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in orphans:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return len(orphans)


MLFLOW_STATUS = {"finished": "FINISHED", "error": "FAILED", "stopped early": "KILLED"}


def settle_child_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, rows: list[dict]) -> int:
    """Make every trial's MLflow run say what Tune decided; returns how many runs were corrected.

    A trial ends its own run only when it succeeds (FINISHED); one that raises tags the error and
    leaves the status here (``trial.record_trial_error``), and one that ASHA stops is cut off
    RUNNING. Tune's verdict (the sweep's rows) is the one users should find in MLflow: stopped
    early is KILLED, not a failure; an error is FAILED.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    verdict = {row["trial_id"]: MLFLOW_STATUS[row["status"]] for row in rows}
    corrected = 0
    for run in client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'"):
        status = verdict.get(run.data.tags.get(TRIAL_TAG), "KILLED" if run.info.status == "RUNNING" else run.info.status)
        if status != run.info.status:
            client.set_terminated(run.info.run_id, status, end_time=run.info.end_time)
            corrected += 1
    return corrected
