"""Issue 19: nothing dropped, nothing overwritten, every bad input a one-line error.

``CASES`` is the table: each row is one bad input or fault from the issue, run through the real
``msmae`` command line in-process (typer's CliRunner) and checked for its exit code (0 only
when the result is right, 2 for usage, 1 for failures), one readable ``error:`` line naming the
file or option, no traceback, and no output left half-written or overwritten. The corpus is
generated per case in ``tmp_path`` (``tests/bad_inputs.py``). Cases that need a real process
(Ctrl-C, the console script's stderr) or Ray (predict and evaluate on real files) are the
tests below the table; none trains a model.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from bad_inputs import (
    bomb_png,
    checkpoint_folder,
    fifo,
    image_folder,
    manifest_csv,
    symlink,
    text,
    tree_snapshot,
    write_image,
)
from cli_harness import MSMAE, Q, Case, assert_clean, invoke, no_leftovers, reasons, summary, run_case  # noqa: F401

# --- ingest: lost or corrupted data -----------------------------------------------------------

def folder_symlink(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3})
    symlink(src / "b", image_folder(ctx.tmp / "elsewhere", {"b": 3}, seed=50) / "b")
    return ["ingest", src, "--out", ctx.tmp / "o", *Q]


def folder_symlink_check(ctx):
    s = summary(ctx.tmp / "o")
    assert s["classes"] == {"a": 0, "b": 1} and s["num_images"] == 6 and s["quarantined"] == 0


def bad_links(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3, "b": 3})
    symlink(src / "a" / "broken.png", ctx.tmp / "nowhere.png")
    symlink(src / "a" / "loop1.png", src / "a" / "loop2.png")
    symlink(src / "a" / "loop2.png", src / "a" / "loop1.png")
    symlink(src / "b" / "up", src)  # a folder link back to its own root
    fifo(src / "b" / "pipe.png")
    return ["ingest", src, "--out", ctx.tmp / "o", *Q]


def bad_links_check(ctx):
    s = summary(ctx.tmp / "o")
    assert reasons(ctx.tmp / "o" / "quarantine.csv") == {"broken_symlink": 1, "symlink_loop": 3, "not_a_regular_file": 1}
    assert s["num_listed"] == s["num_images"] + s["quarantined"] == 6 + 5


def two_sources(ctx):
    ctx.first = image_folder(ctx.tmp / "first", {"a": 3, "b": 3})
    second = image_folder(ctx.tmp / "second", {"a": 3, "b": 3}, seed=7)
    assert_clean(invoke(["ingest", ctx.first, "--out", ctx.tmp / "o", *Q]), 0)
    ctx.before = tree_snapshot(ctx.tmp / "o")
    ctx.args = ["ingest", second, "--out", ctx.tmp / "o", *Q]
    return ctx.args


def two_sources_check(ctx):
    assert tree_snapshot(ctx.tmp / "o") == ctx.before  # refused: not a byte changed
    assert_clean(invoke([*ctx.args, "--force"]), 0)
    assert summary(ctx.tmp / "o")["source"]["root"] == str((ctx.tmp / "second").resolve())
    no_leftovers(ctx.tmp)


def strict_into_dataset(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3, "b": 3})
    assert_clean(invoke(["ingest", src, "--out", ctx.tmp / "o", *Q]), 0)
    ctx.before = tree_snapshot(ctx.tmp / "o")
    text(src / "a" / "bad.png", "not a png")
    ctx.args = ["ingest", src, "--out", ctx.tmp / "o", *Q]
    return [*ctx.args, "--strict"]


def strict_into_dataset_check(ctx):
    assert tree_snapshot(ctx.tmp / "o") == ctx.before  # dataset.json, shards and quarantine.csv as they were
    assert reasons(ctx.tmp / "o.rejected-quarantine.csv") == {"not_an_image": 1}
    again = invoke(ctx.args)  # the next plain ingest sees the change, not "up to date"
    assert_clean(again, 0)
    assert "up to date" not in again.output and reasons(ctx.tmp / "o" / "quarantine.csv") == {"not_an_image": 1}
    no_leftovers(ctx.tmp)


def foreign_folder(ctx):
    text(ctx.tmp / "o" / "notes.txt", "mine")
    return ["ingest", image_folder(ctx.tmp / "src", {"a": 2, "b": 2}), "--out", ctx.tmp / "o", *Q]


def out_untouched(ctx):
    assert tree_snapshot(ctx.tmp / "o") == {"notes.txt": b"mine"}


def dataset_with_foreign_file(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
    assert_clean(invoke(["ingest", src, "--out", ctx.tmp / "o", *Q]), 0)
    text(ctx.tmp / "o" / "README", "mine")
    ctx.before = tree_snapshot(ctx.tmp / "o")
    return ["ingest", src, "--out", ctx.tmp / "o", "--seed", "3", *Q]  # a re-ingest that would replace the folder


def unchanged(ctx):
    assert tree_snapshot(ctx.tmp / "o") == ctx.before


def ingest_with(*options: str):
    def build(ctx):
        return ["ingest", image_folder(ctx.tmp / "src", {"glioma": 2, "meningioma": 2}), "--out", ctx.tmp / "o", *Q, *options]
    return build


def nothing_written(ctx):
    assert not (ctx.tmp / "o").exists()
    no_leftovers(ctx.tmp)


def out_is_file(ctx):
    text(ctx.tmp / "o", "a file")
    return ["ingest", image_folder(ctx.tmp / "src", {"a": 2, "b": 2}), "--out", ctx.tmp / "o", *Q]


def out_under_file(ctx):
    text(ctx.tmp / "f", "a file")
    return ["ingest", image_folder(ctx.tmp / "src", {"a": 2, "b": 2}), "--out", ctx.tmp / "f" / "o", *Q]


def out_inside_source(ctx):
    return ["ingest", image_folder(ctx.tmp / "src", {"a": 2, "b": 2}), "--out", ctx.tmp / "src" / "ingested", *Q]


# --- ingest: wrongly accepted ------------------------------------------------------------------

def na_labels(ctx):
    labels = ["x", "y", "x", "y", "NA", "nan", "NaN", "None", "null", " "]
    return ["ingest", "--manifest", manifest_csv(ctx.tmp / "m.csv", ctx.tmp / "img", labels), "--image-root", ctx.tmp / "img",
            "--image-col", "image", "--label-col", "label", "--out", ctx.tmp / "o", *Q]


def na_labels_check(ctx):
    assert summary(ctx.tmp / "o")["classes"] == {"x": 0, "y": 1}
    assert reasons(ctx.tmp / "o" / "quarantine.csv") == {"missing_label": 6}


def tiny_image_and_class(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3, "b": 1})
    write_image(src / "a" / "one_pixel.png", size=(1, 1))
    return ["ingest", src, "--out", ctx.tmp / "o", *Q]


def tiny_check(ctx):
    assert reasons(ctx.tmp / "o" / "quarantine.csv") == {"min_side": 1}
    assert summary(ctx.tmp / "o")["warnings"]


# --- ingest: tracebacks before ----------------------------------------------------------------

def manifest_file(content: str, name: str = "m.csv"):
    def build(ctx):
        image_folder(ctx.tmp / "img", {"a": 1})
        return ["ingest", "--manifest", text(ctx.tmp / name, content), "--image-root", ctx.tmp / "img",
                "--image-col", "image", "--label-col", "label", "--out", ctx.tmp / "o", *Q]
    return build


# --- run / pretrain / finetune -------------------------------------------------------------------

def run_with(*options: str, source: str = "src"):
    def build(ctx):
        image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
        return ["run", ctx.tmp / source, "--workdir", ctx.tmp / "w", *options]
    return build


def no_workdir(ctx):
    assert not (ctx.tmp / "w").exists()


def bad_config_file(ctx):
    return run_with("--config", text(ctx.tmp / "broken.yaml", "data: {img_size: 64\nmodel: [\n"))(ctx)


def workdir_is_file(ctx):
    text(ctx.tmp / "w", "a file")
    return run_with()(ctx)


def junk_only(ctx):
    text(ctx.tmp / "junk" / "a" / "x.png", "not a png")
    text(ctx.tmp / "junk" / "b" / "y.png", "")
    return ["run", ctx.tmp / "junk", "--workdir", ctx.tmp / "w"]


def no_training_started(ctx):
    assert not (ctx.tmp / "w" / "storage").exists() and not (ctx.tmp / "w" / "last_run.json").exists()


def empty_val(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
    assert_clean(invoke(["ingest", src, "--out", ctx.tmp / "d", "--val", "0", *Q]), 0)
    return ["run", ctx.tmp / "d", "--workdir", ctx.tmp / "w"]


def damaged_dataset(ctx):
    text(ctx.tmp / "d" / "dataset.json", "{not json")
    return ["run", ctx.tmp / "d", "--workdir", ctx.tmp / "w"]


def finished_run(ctx):
    image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
    text(ctx.tmp / "w" / "last_run.json", json.dumps({"run_name": "run-1", "mlflow_run_id": "abc", "finished": True,
                                                      "model_name": "m", "model_version": "3", "champion": True}))
    return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "w", "--resume"]


def nothing_registered(ctx):
    assert not (ctx.tmp / "w" / "mlflow.db").exists() and not (ctx.tmp / "w" / "storage").exists()


# --- evaluate / predict (no Ray: each fails before it would start) -------------------------------

def evaluate_with(model: str | Callable = "no/such/model", out: str = "eval.json", *options: str, data: str = "raw",
                  registry: bool = False):
    def build(ctx):
        image_folder(ctx.tmp / "raw", {"a": 2, "b": 2})
        text(ctx.tmp / "f", "a file")
        ref = model(ctx) if callable(model) else model
        store = ["--tracking-uri", ctx.request.getfixturevalue("reliability_registry")] if registry else []
        return ["evaluate", "--model", ref, "--data", ctx.tmp / data, "--out", ctx.tmp / out, *options, *store]
    return build


def random_model(ctx) -> str:
    return str(checkpoint_folder(ctx.tmp / "model", ["tumour", "healthy"]))


def predict_with(input_dir: str, out: str = "p.parquet"):
    def build(ctx):
        (ctx.tmp / "empty").mkdir()
        text(ctx.tmp / "full" / "notes.txt", "someone else's folder")
        text(ctx.tmp / "f", "a file")
        return ["predict", "--model", "no/such/model", "--input", ctx.tmp / input_dir, "--out", ctx.tmp / out]
    return build


# --- tune ----------------------------------------------------------------------------------------

def tune_space(content: str):
    def build(ctx):
        image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
        return ["tune", "--data", ctx.tmp / "src", "--space", text(ctx.tmp / "space.yaml", content), "--workdir", ctx.tmp / "w"]
    return build


def all_trials_failed(ctx):
    import tuning.sweep
    from tuning.sweep import SweepOutcome

    rows = [{"trial_id": "t0", "status": "error"}, {"trial_id": "t1", "status": "error"}]
    ctx.request.getfixturevalue("monkeypatch").setattr(
        tuning.sweep, "run_sweep", lambda request, log: SweepOutcome("sweep-x", "parent", rows, None, None, False, 1.0))
    return tune_space("masking:\n  finetune: {visible: [0.2, 0.5], masked_share: [0.4, 0.9]}\n")(ctx)


MASKING = "masking:\n  pretrain: {visible: [0.2, 0.5], masked_share: [0.4, 0.9]}\n"

CASES = [
    # lost or corrupted data
    Case("ingest-folder-symlink-is-a-class", folder_symlink, 0, (), folder_symlink_check),
    Case("ingest-broken-looping-links-and-fifo-quarantined", bad_links, 0, ("quarantined 5 of 11",), bad_links_check),
    Case("ingest-other-source-refused-then-force", two_sources, 2, ("--force", "holds a dataset ingested from"), two_sources_check),
    Case("ingest-strict-failure-keeps-dataset", strict_into_dataset, 1, ("--strict", "unchanged", "o.rejected-quarantine.csv"),
         strict_into_dataset_check),
    Case("ingest-out-holds-other-files", foreign_folder, 2, ("holds no msmae dataset",), out_untouched),
    Case("ingest-dataset-folder-with-a-user-file", dataset_with_foreign_file, 2, ("did not write", "README"), unchanged),
    Case("ingest-rows-per-shard-negative", ingest_with("--rows-per-shard", "-1"), 2, ("--rows-per-shard",), nothing_written),
    Case("ingest-rows-per-shard-zero", ingest_with("--rows-per-shard", "0"), 2, ("--rows-per-shard",), nothing_written),
    Case("ingest-out-is-a-file", out_is_file, 2, ("--out", "is a file")),
    Case("ingest-out-under-a-file", out_under_file, 2, ("--out", "is a file, not a folder")),
    Case("ingest-out-inside-source", out_inside_source, 2, ("overlaps the input",), nothing_written),
    # wrongly accepted
    Case("ingest-na-labels-are-missing", na_labels, 0, ("missing_label",), na_labels_check),
    Case("ingest-max-side-negative", ingest_with("--max-side", "-5"), 2, ("--max-side",), nothing_written),
    Case("ingest-min-side-zero", ingest_with("--min-side", "0"), 2, ("--min-side",), nothing_written),
    Case("ingest-workers-zero", ingest_with("--decode-workers", "0"), 2, ("--decode-workers",), nothing_written),
    Case("ingest-val-above-one", ingest_with("--val", "1.5"), 2, ("--val/--test",), nothing_written),
    Case("ingest-val-plus-test-one", ingest_with("--val", "0.5", "--test", "0.5"), 2, ("--val/--test",), nothing_written),
    Case("ingest-mode-unknown", ingest_with("--mode", "CMYK"), 2, ("--mode",), nothing_written),
    Case("ingest-classes-repeated", ingest_with("--classes", "glioma,glioma,meningioma"), 2, ("--classes", "glioma"), nothing_written),
    Case("ingest-classes-empty-name", ingest_with("--classes", "glioma,,meningioma"), 2, ("--classes",), nothing_written),
    Case("ingest-1px-image-and-one-image-class", tiny_image_and_class, 0, ("min_side", "warning: class 'b' has 1 usable image"), tiny_check),
    # tracebacks before
    Case("ingest-source-missing", lambda ctx: ["ingest", ctx.tmp / "nope", "--out", ctx.tmp / "o"], 1, ("nope", "is not a directory")),
    Case("ingest-manifest-malformed", manifest_file('image,label\na,b,c\n"x\n'), 1, ("m.csv", "cannot be read as CSV")),
    Case("ingest-manifest-empty", manifest_file(""), 1, ("m.csv", "cannot be read as CSV")),
    Case("ingest-manifest-header-only", manifest_file("image,label\n"), 1, ("no usable images",)),
    Case("ingest-manifest-missing-column", manifest_file("image,lbl\na_0,a\n"), 1, ("'label'", "--label-col")),
    Case("ingest-manifest-not-a-table", manifest_file("x", name="m.txt"), 1, ("m.txt", ".csv or .parquet")),
    Case("ingest-manifest-without-columns", lambda ctx: ["ingest", "--manifest", ctx.tmp / "m.csv", "--out", ctx.tmp / "o"], 2,
         ("--image-root", "--image-col", "--label-col")),
    # run: configuration and resources checked before ingest or Ray
    Case("run-config-yaml-syntax", bad_config_file, 2, ("broken.yaml", "not valid YAML"), no_workdir),
    Case("run-set-yaml-syntax", run_with("--set", "finetune.epochs=[1"), 2, ("--set", "finetune.epochs"), no_workdir),
    Case("run-set-key-unknown", run_with("--set", "finetune.epoch=3"), 2, ("finetune.epoch", "unknown key"), no_workdir),
    Case("run-mask-ratio-masks-no-patch", run_with("--set", "pretrain.masking.mask_ratio=0.01"), 2, ("mask_ratio",), no_workdir),
    Case("run-img-size-not-a-patch-multiple", run_with("--set", "data.img_size=60"), 2, ("img_size",), no_workdir),
    Case("run-checkpoint-metric-unknown", run_with("--set", "checkpoint.metric=val_bogus"), 2, ("checkpoint.metric",), no_workdir),
    Case("run-source-missing", run_with(source="nope"), 2, ("nope", "does not exist"), no_workdir),
    Case("run-workdir-is-a-file", workdir_is_file, 2, ("--workdir", "is a file")),
    Case("run-tracking-server-dead", run_with("--tracking-uri", "http://127.0.0.1:1"), 1,
         ("http://127.0.0.1:1", "not reachable"), no_workdir),
    Case("run-ingest-error-no-usable-images", junk_only, 1, ("no usable images",), no_training_started),
    Case("run-empty-val-split", empty_val, 1, ("val split is empty",), no_training_started),
    Case("run-dataset-json-damaged", damaged_dataset, 1, ("dataset.json is not valid JSON", "msmae ingest"), no_training_started),
    Case("run-resume-without-run", run_with("--resume"), 2, ("--resume", "no earlier run")),
    Case("run-resume-finished-registers-nothing", finished_run, 0, ("already finished", "nothing registered again"), nothing_registered),
    # evaluate / predict
    Case("evaluate-out-under-a-file", evaluate_with(out="f/eval.json"), 2, ("--out", "is a file, not a folder")),
    Case("evaluate-out-is-a-folder", evaluate_with(out="raw"), 2, ("--out", "is a folder")),
    Case("evaluate-split-unknown", evaluate_with("m", "eval.json", "--split", "validation"), 2, ("--split",)),
    Case("evaluate-data-missing", evaluate_with(data="nope"), 2, ("--data", "does not exist")),
    Case("evaluate-img-size-option-gone", evaluate_with("m", "eval.json", "--img-size", "64"), 2, ("--img-size",)),
    Case("evaluate-model-not-found", evaluate_with("models:/reliability-missing@champion", registry=True), 1,
         ("MLflow:", "reliability-missing")),
    Case("evaluate-alias-not-found", evaluate_with("models:/reliability-model@champion", registry=True), 1, ("MLflow:", "champion")),
    Case("evaluate-run-not-found", evaluate_with("runs:/0123456789abcdef0123456789abcdef/model", registry=True), 1,
         ("MLflow:", "0123456789abcdef0123456789abcdef")),
    Case("evaluate-tracking-server-dead", evaluate_with("models:/m@champion", "eval.json", "--tracking-uri", "http://127.0.0.1:1"), 1,
         ("http://127.0.0.1:1", "not reachable")),
    Case("evaluate-not-a-model", evaluate_with("no/such/model"), 1, ("no/such/model", "checkpoint folder")),
    Case("evaluate-ingest-error-no-class-of-the-model", evaluate_with(random_model), 1, ("nothing to evaluate", "tumour")),
    Case("predict-input-missing", predict_with("nope"), 2, ("--input", "does not exist")),
    Case("predict-input-empty", predict_with("empty"), 1, ("holds no files",)),
    # --out is a folder of Parquet shards: a file, or a folder holding anything but earlier predictions, is refused
    Case("predict-out-is-a-foreign-folder", predict_with("empty", out="full"), 2, ("--out", "is a folder holding other files")),
    Case("predict-out-is-a-file", predict_with("empty", out="f"), 2, ("--out", "is a file")),
    # tune: the space checked before anything
    Case("tune-space-yaml-syntax", tune_space("masking: {pretrain: [\n"), 2, ("space.yaml", "not valid YAML"), no_workdir),
    Case("tune-space-objective-unknown", tune_space("objective: val_bogus\n" + MASKING), 2, ("objective", "val_bogus"), no_workdir),
    Case("tune-space-grace-period-negative", tune_space("scheduler: {grace_period: -3}\n" + MASKING), 2, ("scheduler.grace_period",), no_workdir),
    Case("tune-space-reduction-factor-zero", tune_space("scheduler: {reduction_factor: 0}\n" + MASKING), 2,
         ("scheduler.reduction_factor",), no_workdir),
    Case("tune-space-masking-entry-a-list", tune_space("masking:\n  pretrain: [0.2, 0.5]\n"), 2, ("masking.pretrain",), no_workdir),
    Case("tune-space-params-a-list", tune_space("params: [finetune.blr]\n"), 2, ("params",), no_workdir),
    Case("tune-space-choice-value-rejected", tune_space(MASKING + "params:\n  finetune.masking.strategy: {choice: [attention, bogus, all]}\n"),
         2, ("finetune.masking.strategy",), no_workdir),
    Case("tune-no-trial-finished-exits-1", all_trials_failed, 1, ("no trial finished", "2 error", "nothing registered")),
]


@pytest.fixture(scope="module", autouse=True)
def reliability_loggers_outside_the_runner():
    """Ray (Data, Train, Tune), MLflow and torch attach logging handlers to the sys.stderr of the moment they are
    first imported. Imported inside CliRunner.invoke (the commands import them lazily), they would keep its
    captured stream, closed after that invocation, and a later log line would print a logging traceback into
    another command's output: import what the commands import here, outside any invocation."""
    import pipelines.serve.predict  # noqa: F401
    import pipelines.train.run  # noqa: F401
    import tuning.sweep  # noqa: F401


@pytest.fixture(scope="module")
def reliability_registry(tmp_path_factory) -> str:
    """A SQLite MLflow store with one registered model and no alias (``--tracking-uri`` for the lookups that must fail)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    MlflowClient(uri).create_registered_model("reliability-model")
    return uri


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_case(case, tmp_path, request)


def test_debug_shows_the_exception_instead_of_one_line(tmp_path: Path) -> None:
    result = invoke(["--debug", "ingest", tmp_path / "nope", "--out", tmp_path / "o"])
    assert isinstance(result.exception, FileNotFoundError)


def test_the_console_script_prints_one_line_on_stderr(tmp_path: Path) -> None:
    proc = subprocess.run([MSMAE, "ingest", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: ImageFolder root {tmp_path / 'nope'} is not a directory"]


def test_ctrl_c_before_anything_was_saved_says_so(tmp_path: Path) -> None:
    """A real SIGINT to a real process, caught while it waits on a tracking server that accepts and never answers."""
    image_folder(tmp_path / "src", {"a": 2, "b": 2})
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(120)
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        proc = subprocess.Popen([MSMAE, "run", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--tracking-uri", uri],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            connection, _ = server.accept()  # the command is inside its tracking check now
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
            connection.close()
        finally:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: stopped before anything was saved" in stderr


def test_ctrl_c_once_the_run_saved_its_state_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.train.run

    def interrupted(source, cfg, workdir, *args, **kwargs):
        workdir.mkdir(parents=True)
        (workdir / pipelines.train.run.STATE_NAME).write_text(json.dumps({"run_name": "run-1"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.train.run, "run_pipeline", interrupted)
    result = invoke(["run", image_folder(tmp_path / "src", {"a": 2, "b": 2}), "--workdir", tmp_path / "w"])
    assert result.exit_code == 130 and "Traceback" not in result.output
    assert "interrupted: continue it from its last checkpoint with the same command plus --resume" in result.output


def test_a_resumed_stage_logs_one_value_per_epoch(reliability_registry: str) -> None:
    """The interrupted epoch is trained again after --resume; MLflow keeps one value per step, not two."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import EpochLogger

    uri = reliability_registry  # a SQLite store made once for this module (its schema costs seconds)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    first = EpochLogger(uri, run_id, "pretrain")
    for epoch in range(3):  # epoch 2 logged, then the driver dies before its checkpoint is kept
        first.log({"epoch": epoch, "train_loss": 1.0}, epoch)
    resumed = EpochLogger(uri, run_id, "pretrain")  # restored from epoch 1's checkpoint
    for epoch in (2, 3):
        resumed.log({"epoch": epoch, "train_loss": 0.5}, epoch)
    steps = [m.step for m in client.get_metric_history(run_id, "pretrain/train_loss")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_predict_and_evaluate_give_every_file_a_row_or_a_quarantine_line(ray_local, tmp_path: Path, monkeypatch) -> None:
    """On Ray, with a random-weight checkpoint: every file under --input is a Parquet row; every file of a raw
    folder is scored or listed in the JSON's quarantine; outputs land under folders that did not exist; no
    temporary copy is left behind."""
    import tempfile

    import pyarrow.parquet as pq

    model = checkpoint_folder(tmp_path / "model", ["a", "b"])
    incoming = tmp_path / "incoming"
    for name, fmt in (("plain.png", "PNG"), ("sub/photo.jpg", "JPEG"), ("anim.gif", "GIF"), ("no_extension", "JPEG")):
        write_image(incoming / name, seed=len(name), fmt=fmt)
    symlink(incoming / "linked", image_folder(tmp_path / "elsewhere", {"c": 1}) / "c")
    bomb_png(incoming / "huge.png")
    symlink(incoming / "gone.png", tmp_path / "nowhere.png")
    text(incoming / "notes.txt", "not an image")
    fifo(incoming / "pipe")
    out = tmp_path / "new" / "folder" / "predictions.parquet"
    result = invoke(["predict", "--model", model, "--input", incoming, "--out", out])
    assert_clean(result, 0, ("9 files: 5 predicted, 4 not images",))
    table = pq.read_table(out).to_pylist()
    by_name = {Path(r["path"]).relative_to(incoming).as_posix(): r for r in table}
    assert set(by_name) == {"plain.png", "sub/photo.jpg", "anim.gif", "no_extension", "linked/c_0.png", "huge.png", "gone.png",
                            "notes.txt", "pipe"}
    assert {k: r["reason"] for k, r in by_name.items() if not r["ok"]} == {
        "huge.png": "too_large", "gone.png": "broken_symlink", "notes.txt": "not_an_image", "pipe": "not_a_regular_file"}
    assert all(r["predicted_class"] in ("a", "b") and abs(r["prob_a"] + r["prob_b"] - 1) < 1e-4 for r in table if r["ok"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.parquet"]

    raw = image_folder(tmp_path / "raw", {"a": 2, "b": 2, "unknown": 1})
    text(raw / "a" / "junk.png", "not a png")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    evaluation = tmp_path / "another" / "eval.json"
    result = invoke(["evaluate", "--model", model, "--data", raw, "--out", evaluation])
    assert_clean(result, 0, ("2 quarantined",))
    metrics = json.loads(evaluation.read_text())
    assert metrics["train"]["num_samples"] == 4
    assert Counter(q["reason"] for q in metrics["quarantine"]) == {"not_an_image": 1, "unknown_label": 1}
    assert list(scratch.iterdir()) == []  # the raw folder's temporary copy is gone


def test_local_ray_is_sized_for_the_workers_and_refuses_gpu_workers_without_a_gpu():
    """A local run asking for more workers than logical CPUs, or for GPU workers on a CPU machine,
    would wait for resources forever: the first gets the CPUs it needs, the second one error line."""
    import torch

    from pipelines import local_ray
    from pipelines.config import load_config

    assert local_ray.local_cpus_for(load_config("demo", ["scaling.workers=8"]).scaling) == 9
    if torch.cuda.device_count():
        pytest.skip("this machine has a GPU")
    with pytest.raises(local_ray.LocalResourcesError, match="scaling.use_gpu"):
        local_ray.local_cpus_for(load_config("demo", ["scaling.use_gpu=true"]).scaling)
