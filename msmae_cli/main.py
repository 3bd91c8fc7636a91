"""The `msmae` command line (typer): every command, each a thin layer over ``pipelines`` or ``tuning``.

Heavy modules are imported inside commands so start-up stays fast. Options are parsed and
the run configuration validated here, at the edge; what goes further in is typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="MSMAE at cluster scale: ingest, train, tune.")


@app.command()
def ingest(
    src: Annotated[Path | None, typer.Argument(help="ImageFolder root (<class>/<file>). Omit when using --manifest.")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for shards, quarantine.csv, dataset.json.")] = ...,
    manifest: Annotated[Path | None, typer.Option(help="CSV or Parquet manifest instead of an ImageFolder.")] = None,
    image_root: Annotated[Path | None, typer.Option(help="Folder the manifest's image ids are relative to.")] = None,
    image_col: Annotated[str | None, typer.Option(help="Manifest column with the image path or id (extension optional).")] = None,
    label_col: Annotated[str | None, typer.Option(help="Manifest column with the class name.")] = None,
    group_col: Annotated[str | None, typer.Option(help="Manifest column with a group (patient, lesion) kept in one split.")] = None,
    classes: Annotated[str | None, typer.Option(help="Comma-separated class names, in id order; others are quarantined as unknown_label.")] = None,
    mode: Annotated[str, typer.Option(help="Pixel mode images are converted to: RGB or L.")] = "RGB",
    max_side: Annotated[int | None, typer.Option(help="Downscale so the longer side is at most this many pixels.")] = None,
    val: Annotated[float, typer.Option(help="Validation fraction (per class, by images, whole groups).")] = 0.2,
    test: Annotated[float, typer.Option(help="Test fraction; 0 for no test split.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
    rows_per_shard: Annotated[int, typer.Option(help="Rows per Parquet shard.")] = 2048,
    workers: Annotated[int | None, typer.Option(help="Decode processes (default: the CPUs this process may use, a container's CPU limit included).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (write no shards) if any file is quarantined.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Validate, de-duplicate and split images into Parquet shards (a no-op when already up to date)."""
    from pipelines.ingest import IngestError, IngestOptions, usable_cpus
    from pipelines.ingest import ingest as run_ingest
    from pipelines.sources import ManifestSpec

    if manifest is not None:
        missing = [n for n, v in (("--image-root", image_root), ("--image-col", image_col), ("--label-col", label_col)) if v is None]
        if missing:
            raise typer.BadParameter(f"--manifest also needs {', '.join(missing)}")
        if src is not None:
            raise typer.BadParameter("give either SRC (an ImageFolder root) or --manifest, not both")
        source: Path | ManifestSpec = ManifestSpec(manifest, image_root, image_col, label_col, group_col)
    elif src is None:
        raise typer.BadParameter("give SRC (an ImageFolder root) or --manifest FILE")
    else:
        source = src
    opts = IngestOptions(
        mode=mode, max_side=max_side, val=val, test=test, seed=seed, strict=strict, rows_per_shard=rows_per_shard,
        classes=[c.strip() for c in classes.split(",")] if classes else None, workers=workers or usable_cpus(),
    )
    try:
        result = run_ingest(source, out, opts, progress=progress, log=typer.echo)
    except (IngestError, FileNotFoundError, ValueError) as e:
        raise _fail(str(e), 1) from e
    s = result.summary
    typer.echo(f"{s['num_images']} images kept, {s['quarantined']} quarantined, {s['duplicate_groups']} duplicate groups "
               f"({s['duplicate_images']} images), {s['label_conflict_groups']} label conflicts → {out}")
    for split, counts in s["counts"].items():
        typer.echo(f"  {split:5s} " + "  ".join(f"{k}={v}" for k, v in counts.items()))


SourceArg = Annotated[Path, typer.Argument(help="Raw ImageFolder root, or a folder made by `msmae ingest`.")]
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name under configs/ (demo, btmd-base) or a YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set finetune.epochs=50 (repeatable).")]
WorkdirOpt = Annotated[Path, typer.Option(help="Folder for ingested data, checkpoints, MLflow store.")]
TrackingOpt = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or SQLite in --workdir).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Ray Train workers (overrides scaling.workers).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the last run in --workdir from its checkpoints.")]
FailOpt = Annotated[int | None, typer.Option(hidden=True, help="Fault injection for tests: one worker raises at this epoch.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _config(config: str, set_: list[str] | None, values: dict | None = None):
    """The validated run configuration (preset + ``--set`` + typed options), or a usage error naming the key."""
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(config, set_ or [], values)
    except ConfigError as e:
        raise _fail(str(e), 2) from e


def _train(
    stages: tuple[str, ...], source: Path, config: str, set_: list[str] | None, workdir: Path, tracking_uri: str | None,
    workers: int | None, resume: bool, fail_at_epoch: int | None, init: Path | None = None,
) -> None:
    """What `run`, `pretrain` and `finetune` share: validate everything up front, then train."""
    cfg = _config(config, set_, {"scaling.workers": workers} if workers is not None else None)
    if not source.exists():
        raise _fail(f"{source} does not exist", 2)
    from pipelines.checkpoint import STATE_FILE, is_checkpoint

    if init is not None and not is_checkpoint(init):
        raise _fail(f"--init {init} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one", 2)
    from pipelines.run import run_pipeline
    from pipelines.tracking import resolve_tracking_uri

    try:
        run_pipeline(
            source, cfg, workdir, resolve_tracking_uri(tracking_uri, workdir), resume=resume, fail_at_epoch=fail_at_epoch,
            log=typer.echo, stages=stages, init_checkpoint=str(init.resolve()) if init else None,
        )
    except FileNotFoundError as e:
        raise _fail(str(e), 1) from e


@app.command()
def run(
    source: SourceArg = Path("data/sample/btmd"), config: ConfigOpt = "demo", set_: SetOpt = None,
    workdir: WorkdirOpt = Path("msmae-work"), tracking_uri: TrackingOpt = None, workers: WorkersOpt = None,
    resume: ResumeOpt = False, fail_at_epoch: FailOpt = None,
) -> None:
    """Ingest -> pre-train -> fine-tune -> evaluate -> register, in one command."""
    _train(("pretrain", "finetune"), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch)


@app.command()
def pretrain(
    source: SourceArg, config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, workers: WorkersOpt = None, resume: ResumeOpt = False, fail_at_epoch: FailOpt = None,
) -> None:
    """MSMAE pre-training only; prints the checkpoint folder to give `msmae finetune --init`."""
    _train(("pretrain",), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch)


@app.command()
def finetune(
    source: SourceArg,
    init: Annotated[Path | None, typer.Option("--init", help="Pre-training checkpoint folder (omit: train from random weights).")] = None,
    config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, workers: WorkersOpt = None, resume: ResumeOpt = False, fail_at_epoch: FailOpt = None,
) -> None:
    """Fine-tuning (tokens dropped as finetune.masking.strategy says) -> evaluate -> register."""
    _train(("finetune",), source, config, set_, workdir, tracking_uri, workers, resume, fail_at_epoch, init)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="A folder made by `msmae ingest`, or a raw labelled ImageFolder.")],
    split: Annotated[str, typer.Option(help="Split of an ingested folder: val, test, train, or all.")] = "val",
    out: Annotated[Path, typer.Option(help="Where to write the metrics JSON.")] = Path("evaluation.json"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
) -> None:
    """Evaluate a model on whole images at the size it was trained at; print a metrics table and write JSON."""
    import json

    from pipelines.evaluate import evaluate_data

    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    try:
        results = evaluate_data(model, data, split, log=typer.echo)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e), 1) from e
    out.write_text(json.dumps(results, indent=2, default=str))
    typer.echo(f"metrics written to {out}")


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    input_dir: Annotated[Path, typer.Option("--input", help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")] = Path("predictions.parquet"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
) -> None:
    """Predict every image of a folder (at the model's own size) with Ray Data batch inference; write path, class, probabilities."""
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    from pipelines.local_ray import ensure_ray
    from pipelines.predict import predict_folder

    ensure_ray()
    try:
        summary = predict_folder(model, input_dir, out)
    except (FileNotFoundError, ValueError) as e:
        raise _fail(str(e), 1) from e
    typer.echo(f"{summary['images']} images predicted ({summary['unreadable']} unreadable, marked ok=false) -> {summary['out']}")


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
    cpus_per_worker: Annotated[float, typer.Option(help="CPUs per Ray Train worker.")] = 1.0,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per Ray Train worker (0: CPU training).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of Optuna's TPE sampler.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted sweep in --workdir.")] = False,
    fail_trial: Annotated[int | None, typer.Option(hidden=True, help="Fault injection for tests: this trial raises.")] = None,
) -> None:
    """Sweep masking ratios and schedules (Optuna TPE + ASHA on Ray Tune); register the best model."""
    cfg = _config(config, set_)
    if not data.exists():
        raise _fail(f"--data {data} does not exist", 2)
    from pipelines.config import ConfigError
    from tuning.space import SpaceError
    from tuning.sweep import SweepRequest, run_sweep

    request = SweepRequest(
        data=data, space=space, trials=trials, config=cfg, preset=config, workdir=workdir,
        tracking_uri=tracking_uri, max_concurrent=max_concurrent, workers_per_trial=workers_per_trial,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, seed=seed, resume=resume, fail_trial=fail_trial,
    )
    try:
        outcome = run_sweep(request, log=typer.echo)
    except (ConfigError, SpaceError, FileNotFoundError, FileExistsError) as e:
        raise _fail(str(e), 2) from e
    typer.echo(f"sweep {outcome.sweep_name} done in {outcome.seconds:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
