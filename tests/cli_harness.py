"""The harness of the table-driven reliability tests: a case is a bad input built in ``tmp_path``, run through
the real ``msmae`` command line in-process, and checked for its exit code, one clean ``error:`` line and what
it left on disk (``tests/test_reliability.py``, ``tests/test_reliability_round2.py``)."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
from typer.testing import CliRunner

from msmae_cli import app

Q = ["--no-progress", "--decode-workers", "1"]  # ingest: quiet, one process
MSMAE = str(Path(sys.executable).with_name("msmae"))


def invoke(args: list) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_clean(result, code: int, expect: tuple[str, ...] = ()) -> None:
    """The exit code, no traceback, and for a failure exactly one ``error:`` line (or typer's own usage message)."""
    output = result.output
    assert result.exit_code == code, output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    if code == 0:
        assert not errors, output
    elif errors or "Usage:" not in output:  # typer's own usage errors (unknown option) come boxed, with exit 2
        assert len(errors) == 1, output
    for fragment in expect:
        assert fragment in output, f"{fragment!r} not in:\n{output}"


def summary(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())


def reasons(csv: Path) -> dict[str, int]:
    return dict(Counter(pl.read_csv(csv)["reason"].to_list()))


def no_leftovers(folder: Path) -> None:
    """No staging folder, aside folder or temporary file of an interrupted or refused write."""
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[SimpleNamespace], list]  # writes the inputs into ctx.tmp; returns the command's arguments
    code: int
    expect: tuple[str, ...] = ()  # fragments of the output: the error line names the file or option
    check: Callable[[SimpleNamespace], None] | None = None  # what must (not) be on disk afterwards


def run_case(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    ctx = SimpleNamespace(tmp=tmp_path, request=request)
    args = case.build(ctx)
    start = time.monotonic()
    result = invoke(args)
    assert_clean(result, case.code, case.expect)
    assert time.monotonic() - start < 60, "a bad input must fail in seconds"
    if case.check:
        case.check(ctx)
