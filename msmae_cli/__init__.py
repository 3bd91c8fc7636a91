"""The ``msmae`` command line: one typer app over ``pipelines`` (ingest, train, evaluate, predict)
and ``tuning`` (tune). It sits above both packages so that neither owns the other's commands;
heavy modules are imported inside each command, so ``msmae --help`` starts fast."""

from msmae_cli.main import app, main

__all__ = ["app", "main"]
