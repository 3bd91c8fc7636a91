"""How ``msmae`` fails: one ``error: ...`` line on stderr and an exit code, never a traceback unless ``--debug``.

Exit codes: 0 only when the result is right; 2 for a usage error (an option, configuration or
search space to fix); 1 for a failure (missing or unreadable input, an unreachable tracking
server, an MLflow lookup that found nothing, a run or sweep that did not finish); 130 when
interrupted. Every command runs under ``ErrorHandlingGroup``, so a known exception raised
anywhere below becomes that one line. ``--debug`` (or ``MSMAE_DEBUG=1``) re-raises it instead.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

USAGE, FAILURE, INTERRUPTED = 2, 1, 130
MAX_MESSAGE = 600  # an MLflow error can carry a whole HTML page; one line must stay readable

# (module, class, exit code, prefix), first match wins. A class is looked up only when its module
# is already imported (nothing can raise a class that was never imported), so this costs no import.
_KNOWN: tuple[tuple[str, str, int, str], ...] = (
    ("pipelines.config", "ConfigError", USAGE, ""),
    ("tuning.space", "SpaceError", USAGE, ""),
    ("pipelines.data.ingest_options", "IngestOptionError", USAGE, ""),
    ("pipelines.outputs", "OutputPathError", USAGE, ""),
    ("pipelines.train.run", "ResumeError", USAGE, ""),
    ("pipelines.train.run", "WorkdirBusy", USAGE, ""),
    ("pipelines.data.sources", "ManifestError", FAILURE, ""),
    ("pipelines.data.ingest_options", "IngestError", FAILURE, ""),
    ("pipelines.tracking", "TrackingUnreachable", FAILURE, ""),
    ("pipelines.local_ray", "LocalResourcesError", USAGE, ""),
    ("pipelines.checkpoint", "CheckpointError", FAILURE, ""),
    ("yaml", "YAMLError", USAGE, "not valid YAML: "),
    ("mlflow.exceptions", "MlflowException", FAILURE, "MLflow: "),
    ("polars.exceptions", "PolarsError", FAILURE, "cannot read the table: "),
    ("ray.train", "TrainingFailedError", FAILURE, "training failed (its checkpoints are kept: --resume continues it): "),
    ("ray.exceptions", "RayError", FAILURE, "Ray: "),
    ("builtins", "ValueError", FAILURE, ""),  # this project's own checks word theirs for the user
)
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

_interrupt_hint: Callable[[], str] | None = None


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: message`` on stderr; raise what this returns to exit with ``code``."""
    from pipelines.redact import mask_text

    typer.secho(f"error: {mask_text(message)}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def on_interrupt(hint: Callable[[], str]) -> None:
    """What Ctrl-C should tell the user from here on (e.g. that ``--resume`` continues the run); asked at the interrupt."""
    global _interrupt_hint
    _interrupt_hint = hint


def one_line(text: str) -> str:
    """Several lines (a ConfigError lists each bad key) joined into one, cut to a readable length."""
    joined = "; ".join(line.strip() for line in str(text).splitlines() if line.strip()).replace(":;", ":")
    return joined if len(joined) <= MAX_MESSAGE else joined[: MAX_MESSAGE - 3] + "..."


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code for ``exc``; an unknown exception is named as one (a bug to report)."""
    if _disk_full(exc):  # first: a full disk, whichever layer noticed it (OSError, SQLite, Ray's wrapper)
        where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return (f"no space left on device{where}; free some space (or choose another --out / --workdir) and run the "
                "command again (a training run continues from its last complete checkpoint with --resume)"), FAILURE
    for module, name, code, prefix in _KNOWN:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return prefix + one_line(getattr(exc, "message", None) or str(exc)), code
    if isinstance(exc, _FILE_ERRORS):
        if exc.filename is not None and exc.strerror:
            return f"{exc.strerror}: {exc.filename}", FAILURE
        return one_line(str(exc)), FAILURE
    return f"unexpected {type(exc).__name__}: {one_line(str(exc))} (re-run with --debug for the traceback)", FAILURE


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC anywhere in the exception's chain, or SQLite's own words for it."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if "database or disk is full" in str(exc) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def debugging(ctx: Any) -> bool:
    return bool(ctx.params.get("debug")) or os.environ.get("MSMAE_DEBUG", "") not in ("", "0")


class ErrorHandlingGroup(TyperGroup):
    """The ``msmae`` command group: every command's exceptions end here as one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        global _interrupt_hint
        _interrupt_hint = None
        from pipelines.console import filtered_streams

        with filtered_streams():  # quiet mode's line filter (pipelines/console.py); the entry point installs it for good
            return self._invoke(ctx)

    def _invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # typer's own exits and usage errors, already worded
        except KeyboardInterrupt:
            typer.secho("interrupted" + (f": {_interrupt_hint()}" if _interrupt_hint else ""), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(INTERRUPTED) from None
        except Exception as exc:
            if debugging(ctx):
                raise
            message, code = describe(exc)
            raise fail(message, code) from None
