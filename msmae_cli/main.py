"""The `msmae` command line (typer): every command, each a thin layer over ``pipelines`` or ``tuning``.

Heavy modules are imported inside commands so start-up stays fast. Options are parsed and
the run configuration validated here, at the edge; what goes further in is typed. Everything
that can be checked without Ray is checked before Ray starts: options, the configuration,
the search space, output paths and the tracking server. Any error ends as one ``error: ...``
line and exit code 2 (usage) or 1 (failure) — see ``msmae_cli/errors.py``; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from msmae_cli.errors import USAGE, ErrorHandlingGroup, fail, on_interrupt

app = typer.Typer(cls=ErrorHandlingGroup, add_completion=False, no_args_is_help=True, help="MSMAE at cluster scale: ingest, train, tune.")

SPLITS = ("val", "test", "train", "all")


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the Python traceback instead of one line (also: MSMAE_DEBUG=1).")] = False,
) -> None:
    """MSMAE at cluster scale: ingest, train, tune."""


@app.command()
def ingest(
    src: Annotated[Path | None, typer.Argument(help="ImageFolder root (<class>/<file>). Omit when using --manifest.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for shards, quarantine.csv, dataset.json.")] = ...,
    manifest: Annotated[Path | None, typer.Option(help="CSV or Parquet manifest instead of an ImageFolder.")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder the manifest's image ids are relative to.")] = None,
    image_col: Annotated[str | None, typer.Option(help="Manifest column with the image path or id (extension optional).")] = None,
    label_col: Annotated[str | None, typer.Option(help="Manifest column with the class name (NA, nan, None, empty: missing).")] = None,
    group_col: Annotated[str | None, typer.Option(help="Manifest column with a group (patient, lesion) kept in one split.")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names, in id order; others are quarantined as unknown_label.")] = None,
    mode: Annotated[str, typer.Option(help="Pixel mode images are converted to: RGB or L.")] = "RGB",
    max_side: Annotated[int | None, typer.Option(help="Downscale so the longer side is at most this many pixels.")] = None,
    min_side: Annotated[int, typer.Option(help="Quarantine images whose shorter side is below this many pixels (reason min_side).")] = 8,
    val: Annotated[float, typer.Option(help="Validation fraction (per class, by images, whole groups).")] = 0.2,
    test: Annotated[float, typer.Option(help="Test fraction; 0 for no test split.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 2048,
    workers: Annotated[int | None, typer.Option(help="Decode processes (default: the CPUs this process may use, a container's CPU limit included).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (write no dataset, keep the one in --out) if any file is quarantined.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a dataset in --out that was ingested from another source.")] = False,
    near_dup: Annotated[float, typer.Option("--near-dup", help="Fingerprint similarity (0.5-1) above which two images are near-copies (re-encoded, resized, slightly cropped) held in one split.")] = 0.98,
    no_near_dup: Annotated[bool, typer.Option("--no-near-dup", help="Join only pixel-identical images (not recommended: near-copies leak across splits).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Hash the shards of an up-to-date dataset against their recorded digests; rebuild it if one differs.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Validate, de-duplicate and split images into Parquet shards (a no-op when already up to date)."""
    from pipelines.data.ingest_options import IngestOptions, usable_cpus
    from pipelines.data.ingest import ingest as run_ingest
    from pipelines.data.sources import ManifestSpec

    if manifest is not None:
        missing = [n for n, v in (("--image-root", image_root), ("--image-col", image_col), ("--label-col", label_col)) if v is None]
        if missing:
            raise fail(f"--manifest also needs {', '.join(missing)}", USAGE)
        if src is not None:
            raise fail("give either SRC (an ImageFolder root) or --manifest, not both", USAGE)
        source: Path | ManifestSpec = ManifestSpec(manifest, image_root, image_col, label_col, group_col)
    elif src is None:
        raise fail("give SRC (an ImageFolder root) or --manifest FILE", USAGE)
    else:
        source = src
    opts = IngestOptions(
        mode=mode, max_side=max_side, min_side=min_side, val=val, test=test, seed=seed, strict=strict, force=force, verify=verify, near_dup=None if no_near_dup else near_dup,
        rows_per_shard=rows_per_shard, classes=[c.strip() for c in classes.split(",")] if classes is not None else None,
        workers=workers if workers is not None else usable_cpus(),
    )
    result = run_ingest(source, out, opts, progress=progress, log=typer.echo)
    s = result.summary
    near = s.get("near_duplicates") or {}
    typer.echo(f"{s['num_images']} images kept, {s['quarantined']} quarantined, {s['duplicate_groups']} duplicate groups "
               f"({s['duplicate_images']} images), {near.get('images', 0)} near-copies held with their copies "
               f"({near.get('pairs', 0)} pairs in near_duplicates.parquet), "
               f"{s['label_conflict_groups']} label conflicts → {out}")
    for split, counts in s["counts"].items():
        typer.echo(f"  {split:5s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))


SourceArg = Annotated[Path, typer.Argument(help="Raw ImageFolder root, or a folder made by `msmae ingest`.")]
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name under configs/ (demo, btmd-base) or a YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set finetune.epochs=50 (repeatable).")]
WorkdirOpt = Annotated[Path, typer.Option(help="Folder for ingested data, checkpoints, MLflow store.")]
TrackingOpt = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: tracking.uri of the config, $MLFLOW_TRACKING_URI, or SQLite in --workdir).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray Train workers (overrides scaling.workers).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the last run in --workdir from its checkpoints.")]
FailOpt = Annotated[int | None, typer.Option(hidden=True, help="Fault injection for tests: one worker raises at this epoch.")]
ModelNameOpt = Annotated[str | None, typer.Option("--model-name", help="Registered model name (tracking.model_name; default msmae-<dataset name>): one @champion per name.")]
ExperimentOpt = Annotated[str | None, typer.Option("--experiment", help="MLflow experiment (tracking.experiment; default msmae-<dataset name>).")]


def _names(model_name: str | None, experiment: str | None) -> dict:
    """``--model-name`` / ``--experiment`` as config values (they win over --set and the preset)."""
    return {k: v for k, v in (("tracking.model_name", model_name), ("tracking.experiment", experiment)) if v is not None}


def _config(config: str, set_: list[str] | None, values: dict | None = None):
    """The validated run configuration (preset + ``--set`` + typed options); a ConfigError is a usage error naming the key."""
    from pipelines.config import load_config

    return load_config(config, set_ or [], values)


def _tracking_uri(explicit: str | None, cfg, workdir: Path) -> str:
    """The tracking URI a training command logs to, checked now: a dead server fails in seconds, not after Ray start-up."""
    from pipelines.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(explicit or cfg.tracking.uri, workdir)
    check_tracking_uri(uri)
    return uri


def _model_tracking(tracking_uri: str | None, model: str) -> None:
    """Point MLflow at ``--tracking-uri`` and, for a registry or run URI, check the server answers."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if model.startswith(("models:/", "runs:/")):
        from pipelines.tracking import check_tracking_uri

        check_tracking_uri(mlflow.get_tracking_uri())


def _folder_arg(path: Path, what: str) -> None:
    if not path.exists():
        raise fail(f"{what} {path} does not exist", USAGE)
    if not path.is_dir():
        raise fail(f"{what} {path} is a file; give a folder", USAGE)


def _resume_hint(state_file: Path, resume: bool, what: str):
    """What Ctrl-C should say: ``--resume`` continues the run once it has saved its state (the state
    file is new or changed since the command started), before that there is nothing to resume."""
    def stamp() -> tuple[int, int] | None:
        try:
            st = state_file.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    before = stamp()

    def hint() -> str:
        if resume or stamp() != before:
            return f"{what} with the same command plus --resume (state: {state_file})"
        return "stopped before anything was saved; nothing to resume, run the same command again"

    return hint


def _train(
    stages: tuple[str, ...], source: Path, config: str, set_: list[str] | None, workdir: Path, tracking_uri: str | None,
    workers: int | None, resume: bool, fail_at_epoch: int | None, init: Path | None = None, names: dict | None = None,
) -> None:
    """What `run`, `pretrain` and `finetune` share: validate everything up front, then train."""
    cfg = _config(config, set_, {**({"scaling.workers": workers} if workers is not None else {}), **(names or {})} or None)
    _folder_arg(source, "SOURCE")
    from pipelines.checkpoint import STATE_FILE, is_checkpoint
    from pipelines.outputs import check_output_dir

    check_output_dir(workdir, "--workdir")
    if init is not None and not is_checkpoint(init):
        raise fail(f"--init {init} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one", USAGE)
    from pipelines.train.run import STATE_NAME, run_pipeline

    on_interrupt(_resume_hint(workdir / STATE_NAME, resume, "continue it from its last checkpoint"))
    uri = _tracking_uri(tracking_uri, cfg, workdir)
    run_pipeline(
        source, cfg, workdir, uri, resume=resume, fail_at_epoch=fail_at_epoch,
        log=typer.echo, stages=stages, init_checkpoint=str(init.resolve()) if init else None, config_name=config,
    )


@app.command()
def run(
    source: SourceArg = Path("data/sample/btmd"), config: ConfigOpt = "demo", set_: SetOpt = None,
    workdir: WorkdirOpt = Path("msmae-work"), tracking_uri: TrackingOpt = None, workers: WorkersOpt = None,
    resume: ResumeOpt = False, fail_at_epoch: FailOpt = None, model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Ingest -> pre-train -> fine-tune -> evaluate -> register, in one command; ends with a summary block."""
    _train(("pretrain", "finetune"), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch,
           names=_names(model_name, experiment))


@app.command()
def pretrain(
    source: SourceArg, config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, workers: WorkersOpt = None, resume: ResumeOpt = False, fail_at_epoch: FailOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """MSMAE pre-training only; prints the checkpoint folder to give `msmae finetune --init`."""
    _train(("pretrain",), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch, names=_names(None, experiment))


@app.command()
def finetune(
    source: SourceArg,
    init: Annotated[Path | None, typer.Option("--init", help="Pre-training checkpoint folder (omit: train from random weights).")] = None,
    config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, workers: WorkersOpt = None, resume: ResumeOpt = False, fail_at_epoch: FailOpt = None,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Fine-tuning (tokens dropped as finetune.masking.strategy says) -> evaluate -> register; ends with a summary block."""
    _train(("finetune",), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch, init, names=_names(model_name, experiment))


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="A folder made by `msmae ingest`, or a raw labelled ImageFolder.")],
    split: Annotated[str, typer.Option(help="Split of an ingested folder: val, test, train, or all.")] = "val",
    out: Annotated[Path, typer.Option(help="Where to write the metrics JSON (folders are made).")] = Path("evaluation.json"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
) -> None:
    """Evaluate a model on whole images at the size it was trained at; print a metrics table and write JSON."""
    import json

    from pipelines.outputs import check_output_file, write_atomic

    if split not in SPLITS:
        raise fail(f"--split must be one of {', '.join(SPLITS)}, got {split!r}", USAGE)
    _folder_arg(data, "--data")
    check_output_file(out, "--out")
    _model_tracking(tracking_uri, model)
    from pipelines.serve.evaluate import evaluate_data

    results = evaluate_data(model, data, split, log=typer.echo)
    write_atomic(out, json.dumps(results, indent=2, default=str).encode())
    typer.echo(f"metrics written to {out}")


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    input_dir: Annotated[Path, typer.Option("--input", help="Folder of images (searched recursively; every file gets a row).")],
    out: Annotated[Path, typer.Option(help="Folder to write the Parquet shards into (made; an earlier predictions folder is replaced whole).")] = Path("predictions"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    actors: Annotated[int | None, typer.Option(min=1, help="Scoring actors (default: one per GPU of the cluster, else one per 4 CPUs).")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(min=0.0, help="GPUs per scoring actor (default: 1 on a GPU cluster, else 0).")] = None,
    heatmaps: Annotated[Path | None, typer.Option(help="Folder for per-image patch-occlusion maps of each prediction (<path>.png, <path>.npy).")] = None,
) -> None:
    """Predict every file of a folder (at the model's own size) with Ray Data batch inference; write path, class, calibrated probabilities."""
    _folder_arg(input_dir, "--input")
    from pipelines.serve.predict import PredictSettings, check_heatmaps_out, check_predictions_out, predict_folder

    check_predictions_out(out)
    _model_tracking(tracking_uri, model)
    if heatmaps is not None:
        check_heatmaps_out(heatmaps, input_dir)
    summary = predict_folder(model, input_dir, out, PredictSettings(batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor),
                             heatmaps=heatmaps)
    reasons = f" {summary['reasons']}" if summary["reasons"] else ""
    typer.echo(f"{summary['images']} files: {summary['images'] - summary['unreadable']} predicted, "
               f"{summary['unreadable']} not images{reasons} (rows with ok=false) -> {summary['out']} "
               f"({summary['shards']} Parquet shards, {summary['pool']['max_actors']} scoring actors)")


@app.command()
def tune(
    data: Annotated[Path, typer.Option("--data", help="Raw ImageFolder root, or a folder made by `msmae ingest`.")],
    space: Annotated[Path, typer.Option("--space", help="Search space YAML.")] = Path("configs/space-masking.yaml"),
    trials: Annotated[int, typer.Option("--trials", min=1, help="Number of trials.")] = 16,
    max_concurrent: Annotated[int | None, typer.Option(min=1, help="Trials at a time (default: as many as the cluster holds now).")] = None,
    config: ConfigOpt = "demo",
    set_: SetOpt = None,
    workdir: Annotated[Path, typer.Option(help="Folder for the sweep's state, checkpoints, Optuna study, MLflow store.")] = Path("msmae-sweep"),
    tracking_uri: TrackingOpt = None,
    workers_per_trial: Annotated[int, typer.Option(min=1, help="Ray Train workers per trial.")] = 1,
    cpus_per_worker: Annotated[float, typer.Option(min=0.01, help="CPUs per Ray Train worker.")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(min=0.0, help="GPUs per Ray Train worker (0: CPU training).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of Optuna's TPE sampler.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted sweep in --workdir.")] = False,
    fail_trial: Annotated[int | None, typer.Option(hidden=True, help="Fault injection for tests: this trial raises.")] = None,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Sweep masking ratios and schedules (Optuna TPE + ASHA on Ray Tune); register the best model.

    Exits 1 when no trial finished (nothing is registered)."""
    cfg = _config(config, set_, _names(model_name, experiment) or None)
    _folder_arg(data, "--data")
    from pipelines.outputs import check_output_dir
    from tuning.space import check_space, load_space

    check_output_dir(workdir, "--workdir")
    check_space(load_space(space), cfg)  # the sweep checks again with its resources applied; this fails before anything else
    from tuning.sweep import STATE_NAME as SWEEP_STATE
    from tuning.sweep import SweepRequest, run_sweep

    on_interrupt(_resume_hint(workdir / SWEEP_STATE, resume, "continue the sweep (finished trials and the Optuna study are kept)"))
    uri = _tracking_uri(tracking_uri, cfg, workdir)
    request = SweepRequest(
        data=data, space=space, trials=trials, config=cfg, preset=config, workdir=workdir,
        tracking_uri=uri, max_concurrent=max_concurrent, workers_per_trial=workers_per_trial,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, seed=seed, resume=resume, fail_trial=fail_trial,
    )
    try:
        outcome = run_sweep(request, log=typer.echo)
    except (FileNotFoundError, FileExistsError) as e:  # --resume without a sweep, or a sweep already there without --resume
        raise fail(str(e), USAGE) from e
    if outcome.best is None:
        statuses = ", ".join(f"{n} {status}" for status, n in sorted(Counter(r["status"] for r in outcome.rows).items())) or "none ran"
        raise fail(f"sweep {outcome.sweep_name}: no trial finished ({statuses}); nothing registered. "
                   "See the trial errors above and the sweep's runs in MLflow", 1)
    typer.echo(f"sweep {outcome.sweep_name} done in {outcome.seconds:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
