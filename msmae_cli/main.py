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
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from msmae_cli.errors import USAGE, fail, on_interrupt
from msmae_cli.help import Command, Group

app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, help="MSMAE at cluster scale: ingest, train, tune.")
command = partial(app.command, cls=Command)  # every command: flags shown as --flag/--no-flag, not <bool>

SPLITS = ("val", "test", "train", "all")
_global = {"verbose": False}


def _version(show: bool) -> None:
    if show:
        from pipelines.data.ingest import tool_version

        typer.echo(f"msmae-ray {tool_version()}")
        raise typer.Exit()


VerboseOpt = Annotated[bool, typer.Option("--verbose/--quiet", help="Show Ray's, MLflow's and Python's own log lines and warnings "
                                          "(quiet by default: the run's own lines only). Also before the command: msmae --verbose run ...")]


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug/--no-debug", help="On an error, show the Python traceback instead of one line (also: MSMAE_DEBUG=1).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose/--quiet", help="Show Ray's, MLflow's and Python's own log lines and warnings in every command.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """MSMAE at cluster scale: ingest, train, tune."""
    _global["verbose"] = verbose


def _console(verbose: bool) -> None:
    """Quiet or verbose output for this command (``pipelines/console.py``), before Ray or MLflow is imported."""
    from pipelines import console

    console.configure(verbose or _global["verbose"])


def _deprecated(old: str, new: str) -> None:
    typer.echo(f"note: {old} is deprecated; use {new}", err=True)


def _data_or_positional(data: Path | None, positional: Path | None) -> Path | None:
    """``--data``, or the old positional spelling of it (kept, with a note)."""
    if positional is None:
        return data
    if data is not None and data != positional:
        raise fail(f"the data is given twice ({positional} and --data {data}); give it once, with --data", USAGE)
    _deprecated("the data folder as a positional argument", "--data FOLDER")
    return positional


def _renamed(new_value, old_value, old: str, new: str):
    """A renamed option: the new name's value, or the old (hidden) name's with a note."""
    if old_value is None:
        return new_value
    if new_value is not None and new_value != old_value:
        raise fail(f"{old} and {new} are the same option (old and new name) with different values; give {new} only", USAGE)
    _deprecated(old, new)
    return old_value


PositionalData = Annotated[Path | None, typer.Argument(hidden=True, show_default=False, help="Old spelling of --data.")]


@command()
def ingest(
    data: Annotated[Path | None, typer.Option("--data", help="ImageFolder root (<class>/<file>). Omit when using --manifest.")] = None,
    src: PositionalData = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for shards, quarantine.csv, excluded.csv, dataset.json.")] = ...,
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
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Leave out files whose path under the root matches this glob "
                                                       "(`*` also matches `/`; a pattern without `/` also matches file names), "
                                                       "e.g. --exclude '*_mask.png' (repeatable; listed in excluded.csv).")] = None,
    keep_mask_like: Annotated[bool, typer.Option("--keep-mask-like/--no-keep-mask-like", help="Ingest files named like the mask of an "
                                                 "image beside them (x_mask.png, x_segmentation.png, x_seg.png beside x.png) as images "
                                                 "too; by default they are left out and listed in excluded.csv.")] = False,
    decode_workers: Annotated[int | None, typer.Option("--decode-workers", help="Decode processes (default: the CPUs this process may use, a container's CPU limit included).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", hidden=True, help="Old name of --decode-workers.")] = None,
    strict: Annotated[bool, typer.Option("--strict/--no-strict", help="Fail (write no dataset, keep the one in --out) if any file is quarantined.")] = False,
    force: Annotated[bool, typer.Option("--force/--no-force", help="Replace a dataset in --out that was ingested from another source.")] = False,
    near_dup: Annotated[float, typer.Option("--near-dup", help="Fingerprint similarity (0.5-1) above which two images are near-copies (re-encoded, resized, slightly cropped) held in one split.")] = 0.98,
    no_near_dup: Annotated[bool, typer.Option("--no-near-dup", help="Join only pixel-identical images (not recommended: near-copies leak across splits).")] = False,
    masks: Annotated[Path | None, typer.Option("--masks", help="Folder of lesion masks <image_id>_segmentation.png (same frame as the image, 255 = lesion), stored with each image; bad ones are listed in mask_quarantine.csv.")] = None,
    mask_col: Annotated[str | None, typer.Option("--mask-col", help="Manifest column with each image's mask file (relative to --masks, else to --image-root).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Hash the shards of an up-to-date dataset against their recorded digests; rebuild it if one differs.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", show_default=False, help="Show a progress bar (default: when the output is a terminal).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Validate, de-duplicate and split images into Parquet shards (a no-op when already up to date).

    Files named like the mask of an image beside them (BUSI's `x_mask.png`, ISIC's `x_segmentation.png`)
    are left out by default; the summary counts images per class and split and warns of imbalance."""
    import sys

    _console(verbose)
    src = _data_or_positional(data, src)
    workers = _renamed(decode_workers, workers, "--workers", "--decode-workers")
    from pipelines.data.ingest_options import IngestOptions, usable_cpus
    from pipelines.data.ingest import ingest as run_ingest
    from pipelines.data.sources import ManifestSpec

    if manifest is not None:
        missing = [n for n, v in (("--image-root", image_root), ("--image-col", image_col), ("--label-col", label_col)) if v is None]
        if missing:
            raise fail(f"--manifest also needs {', '.join(missing)}", USAGE)
        if src is not None:
            raise fail("give either --data (an ImageFolder root) or --manifest, not both", USAGE)
        source: Path | ManifestSpec = ManifestSpec(manifest, image_root, image_col, label_col, group_col)
    elif src is None:
        raise fail("give --data FOLDER (an ImageFolder root, <class>/<file>) or --manifest FILE", USAGE)
    else:
        source = src
    opts = IngestOptions(
        mode=mode, max_side=max_side, min_side=min_side, val=val, test=test, seed=seed, strict=strict, force=force, verify=verify, near_dup=None if no_near_dup else near_dup,
        rows_per_shard=rows_per_shard, classes=[c.strip() for c in classes.split(",")] if classes is not None else None,
        exclude=tuple(exclude or ()), keep_mask_like=keep_mask_like, workers=workers if workers is not None else usable_cpus(),
        masks=str(masks) if masks is not None else None, mask_col=mask_col,
    )
    result = run_ingest(source, out, opts, progress=sys.stderr.isatty() if progress is None else progress, log=typer.echo)
    s = result.summary
    near = s.get("near_duplicates") or {}
    excluded = s.get("excluded") or {}
    left_out = excluded.get("by_pattern", 0) + excluded.get("mask_like", 0)
    left = (f"{left_out} left out ({excluded.get('mask_like', 0)} mask-like, {excluded.get('by_pattern', 0)} --exclude; excluded.csv), "
            if left_out else "")
    typer.echo(f"{s['num_images']} images kept, {s['quarantined']} quarantined, {left}{s['duplicate_groups']} duplicate groups "
               f"({s['duplicate_images']} images), {near.get('images', 0)} near-copies held with their copies "
               f"({near.get('pairs', 0)} pairs in near_duplicates.parquet), "
               f"{s['label_conflict_groups']} label conflicts → {out}")
    from pipelines.data.ingest import class_count_lines

    for line in class_count_lines(s):
        typer.echo(line)


DataOpt = Annotated[Path | None, typer.Option("--data", show_default=False, help="Raw ImageFolder root (<class>/<file>), or a folder made by `msmae ingest`.")]
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Preset name under configs/ (demo, btmd-base) or a YAML file.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set finetune.epochs=50 (repeatable).")]
WorkdirOpt = Annotated[Path, typer.Option(help="Folder for ingested data, checkpoints, MLflow store (default: msmae-work in the current folder).")]
TrackingOpt = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: tracking.uri of the config, $MLFLOW_TRACKING_URI, or SQLite in --workdir).")]
WorkersOpt = Annotated[int | None, typer.Option("--train-workers", help="Ray Train workers (overrides scaling.workers).")]
OldWorkersOpt = Annotated[int | None, typer.Option("--workers", hidden=True, help="Old name of --train-workers.")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the last run in --workdir from its checkpoints.")]
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
    stages: tuple[str, ...], data: Path | None, positional: Path | None, config: str, set_: list[str] | None, workdir: Path,
    tracking_uri: str | None, train_workers: int | None, old_workers: int | None, resume: bool, fail_at_epoch: int | None,
    verbose: bool, init: Path | None = None, names: dict | None = None,
) -> None:
    """What `run`, `pretrain` and `finetune` share: validate everything up front, then train."""
    _console(verbose)
    source = _data_or_positional(data, positional)
    if source is None:
        raise fail("no data given: pass --data FOLDER (an ImageFolder root, <class>/<file>, or a folder made by `msmae ingest`); "
                   "for the bundled sample: --data data/sample/btmd, or run scripts/demo.sh", USAGE)
    workers = _renamed(train_workers, old_workers, "--workers", "--train-workers")
    cfg = _config(config, set_, {**({"scaling.workers": workers} if workers is not None else {}), **(names or {})} or None)
    _folder_arg(source, "--data")
    from pipelines.checkpoint import STATE_FILE, is_checkpoint
    from pipelines.outputs import check_output_dir

    check_output_dir(workdir, "--workdir")
    if init is not None and not is_checkpoint(init):
        raise fail(f"--init {init} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one", USAGE)
    from pipelines.train.run import STATE_NAME, run_pipeline

    on_interrupt(_resume_hint(workdir / STATE_NAME, resume, "continue it from its last checkpoint"))
    uri = _tracking_uri(tracking_uri, cfg, workdir)
    from pipelines import console

    run_pipeline(
        source, cfg, workdir, uri, resume=resume, fail_at_epoch=fail_at_epoch,
        log=typer.echo, stages=stages, init_checkpoint=str(init.resolve()) if init else None, show_config=console.verbose(),
        config_name=config,
    )


@command()
def run(
    data: DataOpt = None, source: PositionalData = None, config: ConfigOpt = "demo", set_: SetOpt = None,
    workdir: WorkdirOpt = Path("msmae-work"), tracking_uri: TrackingOpt = None, train_workers: WorkersOpt = None,
    workers: OldWorkersOpt = None, resume: ResumeOpt = False, verbose: VerboseOpt = False, fail_at_epoch: FailOpt = None,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Ingest -> pre-train -> fine-tune -> evaluate -> register, in one command; ends with a summary block (scripts/demo.sh runs it on the bundled sample)."""
    _train(("pretrain", "finetune"), data, source, config, set_, workdir, tracking_uri, train_workers, workers, resume, fail_at_epoch, verbose,
           names=_names(model_name, experiment))


@command()
def pretrain(
    data: DataOpt = None, source: PositionalData = None, config: ConfigOpt = "demo", set_: SetOpt = None,
    workdir: WorkdirOpt = Path("msmae-work"), tracking_uri: TrackingOpt = None, train_workers: WorkersOpt = None,
    workers: OldWorkersOpt = None, resume: ResumeOpt = False, verbose: VerboseOpt = False, fail_at_epoch: FailOpt = None,
    experiment: ExperimentOpt = None,
) -> None:
    """MSMAE pre-training only; prints the checkpoint folder to give `msmae finetune --init`."""
    _train(("pretrain",), data, source, config, set_, workdir, tracking_uri, train_workers, workers, resume, fail_at_epoch, verbose,
           names=_names(None, experiment))


@command()
def finetune(
    data: DataOpt = None, source: PositionalData = None,
    init: Annotated[Path | None, typer.Option("--init", help="Pre-training checkpoint folder (omit: train from random weights).")] = None,
    config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, train_workers: WorkersOpt = None, workers: OldWorkersOpt = None,
    resume: ResumeOpt = False, verbose: VerboseOpt = False, fail_at_epoch: FailOpt = None,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Fine-tuning (tokens dropped as finetune.masking.strategy says) -> evaluate -> register; ends with a summary block."""
    _train(("finetune",), data, source, config, set_, workdir, tracking_uri, train_workers, workers, resume, fail_at_epoch, verbose, init,
           names=_names(model_name, experiment))


@command()
def segment(
    data: Annotated[Path, typer.Option("--data", help="A folder made by `msmae ingest ... --masks DIR` (images with lesion masks).")],
    init: Annotated[Path | None, typer.Option("--init", help="Pre-training checkpoint folder for the encoder (MSMAE or MAE; omit: from scratch).")] = None,
    config: ConfigOpt = "demo", set_: SetOpt = None, workdir: WorkdirOpt = Path("msmae-work"),
    tracking_uri: TrackingOpt = None, train_workers: WorkersOpt = None, verbose: VerboseOpt = False,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Train a lesion segmenter (the encoder + a SETR head, Dice + BCE; segment.* settings), choose it on validation Dice,
    test it once, register it (default name msmae-<dataset>-segmenter)."""
    _console(verbose)
    cfg = _config(config, set_, {**({"scaling.workers": train_workers} if train_workers is not None else {}), **_names(model_name, experiment)} or None)
    _folder_arg(data, "--data")
    from pipelines.checkpoint import STATE_FILE, is_checkpoint
    from pipelines.outputs import check_output_dir

    check_output_dir(workdir, "--workdir")
    if init is not None and not is_checkpoint(init):
        raise fail(f"--init {init} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one", USAGE)
    uri = _tracking_uri(tracking_uri, cfg, workdir)
    from pipelines.train.segment import run_segmentation

    run_segmentation(data, cfg, workdir, uri, init_checkpoint=str(init.resolve()) if init else None, log=typer.echo, config_name=config)


@command()
def evaluate(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    data: Annotated[Path, typer.Option("--data", help="A folder made by `msmae ingest`, or a raw labelled ImageFolder.")],
    split: Annotated[str, typer.Option(help="Split of an ingested folder: val, test, train, or all.")] = "val",
    out: Annotated[Path, typer.Option(help="Where to write the metrics JSON (folders are made).")] = Path("evaluation.json"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Evaluate a model on whole images at the size it was trained at; print a metrics table and write JSON."""
    import json

    _console(verbose)
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


@command()
def predict(
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion, runs:/ID/model, or a checkpoint folder.")],
    data: Annotated[Path | None, typer.Option("--data", show_default=False, help="Folder of images (searched recursively; every file gets a row).")] = None,
    old_input: Annotated[Path | None, typer.Option("--input", hidden=True, help="Old name of --data.")] = None,
    out: Annotated[Path, typer.Option(help="Folder to write the Parquet shards into (made; an earlier predictions folder is replaced whole).")] = Path("predictions"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI for models:/ URIs.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 64,
    actors: Annotated[int | None, typer.Option(min=1, help="Scoring actors (default: one per GPU of the cluster, else one per 4 CPUs).")] = None,
    gpus_per_actor: Annotated[float | None, typer.Option(min=0.0, help="GPUs per scoring actor (default: 1 on a GPU cluster, else 0).")] = None,
    heatmaps: Annotated[Path | None, typer.Option(help="Folder for per-image patch-occlusion maps of each prediction (<path>.png, <path>.npy).")] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="Segmenters only: folder for each image's lesion mask as <path>.png (at the image's size).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Predict every file of a folder (at the model's own size) with Ray Data batch inference; write path, class, calibrated probabilities.
    With a segmenter (`msmae segment`): each image's lesion mask at its own size (a mask_png column, and --masks DIR)."""
    _console(verbose)
    input_dir = _renamed(data, old_input, "--input", "--data")
    if input_dir is None:
        raise fail("no images given: pass --data FOLDER (searched recursively; every file gets a row)", USAGE)
    _folder_arg(input_dir, "--input" if old_input is not None else "--data")
    from pipelines.serve.predict import PredictSettings, check_heatmaps_out, check_predictions_out, predict_folder

    check_predictions_out(out)
    _model_tracking(tracking_uri, model)
    from pipelines.serve.segment_predict import is_segmenter

    if is_segmenter(model):
        if heatmaps is not None:
            raise fail("--heatmaps explains a classifier's prediction; this model is a segmenter (use --masks DIR)", USAGE)
        if masks is not None:
            check_heatmaps_out(masks, input_dir, "--masks")
        from pipelines.serve.segment_predict import predict_masks

        summary = predict_masks(model, input_dir, out, PredictSettings(batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor),
                                masks_dir=masks)
        reasons = f" {summary['reasons']}" if summary["reasons"] else ""
        typer.echo(f"{summary['images']} files: {summary['images'] - summary['unreadable']} segmented, {summary['unreadable']} not images"
                   f"{reasons} (rows with ok=false) -> {summary['out']} ({summary['shards']} Parquet shards, mask_png column)"
                   + (f"; {summary['masks_written']} masks -> {masks}" if masks is not None else ""))
        return
    if masks is not None:
        raise fail("--masks is for segmenters (models made by `msmae segment`); this model is a classifier", USAGE)
    if heatmaps is not None:
        check_heatmaps_out(heatmaps, input_dir)
    summary = predict_folder(model, input_dir, out, PredictSettings(batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor),
                             heatmaps=heatmaps)
    reasons = f" {summary['reasons']}" if summary["reasons"] else ""
    typer.echo(f"{summary['images']} files: {summary['images'] - summary['unreadable']} predicted, "
               f"{summary['unreadable']} not images{reasons} (rows with ok=false) -> {summary['out']} "
               f"({summary['shards']} Parquet shards, {summary['pool']['max_actors']} scoring actors)")
    if "heatmaps" in summary:
        maps = summary["heatmaps"]
        beyond = f", {maps['beyond_scale']} maps beyond it at full colour" if maps["beyond_scale"] else ""
        typer.echo(f"heatmaps: {maps['figures']} figures (<path>.png over the original, one colour scale: ±{maps['limit']:.3g}{beyond}) "
                   f"and maps (<path>.npy) -> {heatmaps}" + (f"; {maps['skipped']} images moved since scoring got no figure" if maps["skipped"] else ""))


@command()
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
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue the interrupted sweep in --workdir.")] = False,
    verbose: VerboseOpt = False,
    fail_trial: Annotated[int | None, typer.Option(hidden=True, help="Fault injection for tests: this trial raises.")] = None,
    model_name: ModelNameOpt = None, experiment: ExperimentOpt = None,
) -> None:
    """Sweep masking ratios and schedules (Optuna TPE + ASHA on Ray Tune); register the best model.

    Exits 1 when no trial finished (nothing is registered)."""
    _console(verbose)
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
    from pipelines.console import install

    install()  # for the whole process: Ray's forwarded lines can arrive after the command returns
    app()


if __name__ == "__main__":
    main()
