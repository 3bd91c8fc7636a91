"""One spelling of each input across commands (--data, --decode-workers, --train-workers), the old spellings
still accepted with a note, `msmae --version`, `run` without data refused, flags shown as --flag/--no-flag."""

from __future__ import annotations

import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from cli_harness import Q, assert_clean, invoke


def test_version_prints_the_package_version():
    result = invoke(["--version"])
    assert_clean(result, 0)
    assert result.output.strip() == f"msmae-ray {metadata.version('msmae-ray')}"


def test_run_without_data_says_what_to_pass(tmp_path: Path):
    result = invoke(["run", "--workdir", tmp_path / "w"])
    assert_clean(result, 2, ("--data FOLDER", "data/sample/btmd", "scripts/demo.sh"))
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", ["run", "pretrain", "finetune"])
def test_training_commands_take_data_as_option_or_old_positional(command: str, tmp_path: Path):
    """Checked up to the first refusal (a missing folder), before Ray: both spellings reach the same check."""
    missing = tmp_path / "nope"
    new = invoke([command, "--data", missing, "--workdir", tmp_path / "w"])
    assert_clean(new, 2, ("--data", "does not exist"))
    assert "deprecated" not in new.output
    old = invoke([command, missing, "--workdir", tmp_path / "w"])
    assert_clean(old, 2, ("--data", "does not exist", "note: the data folder as a positional argument is deprecated; use --data"))
    both = invoke([command, tmp_path / "a", "--data", tmp_path / "b"])
    assert_clean(both, 2, ("given twice",))


def test_train_workers_and_its_old_name_set_the_same_key(tmp_path: Path):
    for args in (["--train-workers", "0"], ["--workers", "0"]):
        result = invoke(["run", "--data", tmp_path, "--workdir", tmp_path / "w", *args])
        assert_clean(result, 2, ("scaling.workers",))
    assert "note: --workers is deprecated; use --train-workers" in result.output


def test_ingest_data_decode_workers_and_the_old_spellings_agree(tmp_path: Path, data_sample_btmd: Path):
    src = tmp_path / "src"
    for cls in ("glioma", "notumor"):
        (src / cls).mkdir(parents=True)
        for f in sorted((data_sample_btmd / cls).iterdir())[:3]:
            shutil.copy(f, src / cls / f.name)
    new = invoke(["ingest", "--data", src, "--out", tmp_path / "a", *Q])
    assert_clean(new, 0, ("6 images kept",))
    assert "deprecated" not in new.output
    old = invoke(["ingest", src, "--out", tmp_path / "b", "--no-progress", "--workers", "1"])
    assert_clean(old, 0, ("6 images kept", "note: --workers is deprecated; use --decode-workers",
                          "note: the data folder as a positional argument is deprecated"))
    nothing = invoke(["ingest", "--out", tmp_path / "c", *Q])
    assert_clean(nothing, 2, ("--data FOLDER", "--manifest"))


def test_predict_takes_data_and_the_old_input(tmp_path: Path):
    missing = tmp_path / "nope"
    assert_clean(invoke(["predict", "--model", tmp_path, "--data", missing]), 2, ("--data", "does not exist"))
    old = invoke(["predict", "--model", tmp_path, "--input", missing])
    assert_clean(old, 2, ("--input", "does not exist", "note: --input is deprecated; use --data"))
    assert_clean(invoke(["predict", "--model", tmp_path]), 2, ("--data FOLDER",))


@pytest.mark.parametrize("command", ["ingest", "run", "predict", "tune"])
def test_help_shows_flags_as_on_off_pairs_and_hides_the_old_spellings(command: str):
    result = invoke([command, "--help"])
    assert_clean(result, 0)
    assert "<bool>" not in result.output
    assert re.search(r"--verbose\s+--quiet", result.output)
    assert "--data" in result.output
    for old in ("--workers ", "--input "):
        assert old not in result.output, f"{old} is a hidden alias"
    assert "[source]" not in result.output and "[src]" not in result.output
