"""``msmae tune``, added to the pipelines' command line (tuning depends on pipelines, never the reverse)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipelines.cli import ConfigOpt, SetOpt, TrackingOpt, app


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
    from pipelines.config import ConfigError
    from tuning.space import SpaceError
    from tuning.sweep import SweepRequest, run_sweep

    request = SweepRequest(
        data=data, space=space, trials=trials, preset=config, overrides=tuple(set_ or []), workdir=workdir,
        tracking_uri=tracking_uri, max_concurrent=max_concurrent, workers_per_trial=workers_per_trial,
        cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, seed=seed, resume=resume, fail_trial=fail_trial,
    )
    if not data.exists():
        typer.secho(f"error: --data {data} does not exist", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    try:
        outcome = run_sweep(request, log=typer.echo)
    except (ConfigError, SpaceError, FileNotFoundError, FileExistsError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from e
    typer.echo(f"sweep {outcome.sweep_name} done in {outcome.seconds:.0f} s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
