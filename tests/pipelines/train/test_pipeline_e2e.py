"""`msmae run` end to end against a real local Ray cluster and a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY_RUN = [
    "pretrain.epochs=3", "pretrain.warmup_epochs=1", "pretrain.masking.sam_start=1", "pretrain.masking.refresh_every=1",
    "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.masking.refresh_every=1",
    "pretrain.masking.strategy=attention", "finetune.masking.strategy=attention",  # the paper's rule, whatever the demo uses
    "pretrain.batch_size=64", "finetune.batch_size=64", "checkpoint.max_failures=1",
]
MODEL = "msmae-e2e"


@dataclass
class ResumedRun:
    """What the killed-and-resumed `msmae run` left behind."""

    uri: str
    mlflow_run_id: str
    resumed: subprocess.CompletedProcess
    args: list[str]  # the command's arguments after `msmae` (without --resume)
    leaked_checkpoint_copies: set[str]  # local checkpoint folders the resumed run left in the temp folder


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _checkpoint_epochs(storage: Path, stage: str) -> list[int]:
    """Epochs of the checkpoints Ray has persisted for a stage (read from each checkpoint's meta.json)."""
    epochs = []
    for meta in storage.glob(f"*-{stage}/checkpoint_*/meta.json"):
        try:
            epochs.append(int(json.loads(meta.read_text())["metrics"]["epoch"]))
        except (ValueError, KeyError):  # being written right now
            continue
    return sorted(epochs)


@pytest.fixture(scope="module")
def train_resumed_run(train_mlflow_server, data_sample_ingested, ray_local_env, tmp_path_factory) -> ResumedRun:
    """One real `msmae run` process, shared by the tests below (every full run costs minutes on 2 cores):
    a worker raises at pre-training epoch 1 (Ray restarts the group from the checkpoint), then the
    driver is killed outright after epoch 2's checkpoint; `msmae run --resume` finishes the same
    run from there (attention table included), fine-tunes, evaluates and registers the model."""
    tmp = tmp_path_factory.mktemp("resumed_run")
    work, uri = tmp / "work", train_mlflow_server
    msmae_bin = str(Path(sys.executable).with_name("msmae"))
    sets = [a for kv in [*TINY_RUN, "pretrain.epochs=4", f"tracking.model_name={MODEL}", f"tracking.experiment={MODEL}"] for a in ("--set", kv)]
    cmd = [msmae_bin, "run", "--data", str(data_sample_ingested), "--config", "demo", *sets, "--workdir", str(work), "--tracking-uri", uri]
    first_log = tmp / "first.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen([*cmd, "--fail-at-epoch", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ray_local_env)
    deadline = time.time() + 600
    while 2 not in _checkpoint_epochs(work / "storage", "pretrain"):
        assert proc.poll() is None, f"run ended before it could be killed; see {first_log}"
        assert time.time() < deadline, "no checkpoint of pre-training epoch 2 within 10 minutes"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without any clean-up; the cluster lives on
    proc.wait(timeout=30)
    state = json.loads((work / "last_run.json").read_text())
    before = _checkpoint_copies()  # the killed driver's workers may have died mid-write; the resumed run may leave none
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900, env=ray_local_env)
    return ResumedRun(uri, state["mlflow_run_id"], resumed, cmd[1:], _checkpoint_copies() - before)


def _checkpoint_copies() -> set[str]:
    """The workers' local checkpoint folders (``msmae-ckpt-*``) in the machine's temp folder."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("msmae-ckpt-*")}


@pytest.mark.slow
def test_a_killed_worker_and_a_killed_driver_both_resume_and_every_epoch_is_logged(train_resumed_run):
    run = train_resumed_run
    assert run.resumed.returncode == 0, run.resumed.stdout[-3000:] + run.resumed.stderr[-3000:]
    # registered whatever the quality gate said of a 2-epoch model (the alias is the gate's business: issue 27)
    assert re.search(rf"registered {MODEL} version 1 (as @champion|\(no alias\))", run.resumed.stdout), run.resumed.stdout[-3000:]
    epochs = [s for s, _ in _history(run.uri, run.mlflow_run_id, "pretrain/epoch")]
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    # The resumed process starts after the last checkpoint (epoch 2's): it never trains epoch 0 again.
    # (MLflow keeps one value per step whatever happens, so the console is where a re-run would show.)
    assert "[pretrain] epoch 1/4" not in run.resumed.stdout + run.resumed.stderr, "the resumed run trained epoch 0 again"
    assert [s for s, _ in _history(run.uri, run.mlflow_run_id, "finetune/epoch")] == [0, 1]
    assert run.leaked_checkpoint_copies == set(), "every local checkpoint copy is removed once Ray has stored it"
    console = run.resumed.stdout + run.resumed.stderr
    # Rank 0's progress line reaches the driver's console once (Ray Train's print patch would double it).
    assert console.count("[pretrain] epoch 4/4") == 1
    assert "Reporting training result" not in console  # Ray Train's per-report dump, silenced
    assert "Execution plan of Dataset" not in console  # Ray Data's plan per dataset and epoch, silenced
    # The restored table is the one refreshed at epoch 2 (sam_start=1, refresh_every=1 → refreshed again at 3).
    assert {s for s, v in _history(run.uri, run.mlflow_run_id, "pretrain/maps_refreshed") if v > 0} >= {3}


@pytest.mark.slow
def test_the_console_shows_the_runs_own_lines_not_rays(train_resumed_run):
    """Quiet by default (pipelines/console.py), on a real run's captured output: Ray Data's per-execution lines and
    the known-harmless notes are gone, the epoch lines come without Ray's worker prefix, and a captured (not a
    terminal) stream has no ANSI codes."""
    out, err = train_resumed_run.resumed.stdout, train_resumed_run.resumed.stderr
    console = out + err
    for noise in ("execution finished", "Progress bars disabled", "PreemptionWatcher", "RayDeprecationWarning",
                  "Successfully registered model", "Downloading artifacts", "\x1b["):
        assert noise not in console, f"{noise!r} in the console:\n{console[-3000:]}"
    assert re.search(r"^\[pretrain\] epoch 4/4  loss ", out, re.M), out[-3000:]
    assert re.search(r"^\[finetune\] epoch 2/2  loss ", out, re.M), out[-3000:]
    assert "configuration: tiny ViT" in out and "resolved configuration:" not in out
    assert len(console.splitlines()) < 60, console  # 3 + 2 epochs, the report, the registration


@pytest.mark.slow
def test_the_run_logs_attention_refreshes_final_metrics_and_figures(train_resumed_run):
    from mlflow.tracking import MlflowClient

    run = train_resumed_run
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    # After each refresh (epochs 1, 2, 3; epoch 1 again after the worker's restart) every worker held the identical table.
    equal = _history(run.uri, run.mlflow_run_id, "pretrain/attention_table_replicas_equal")
    assert {s for s, _ in equal} == {1, 2, 3} and all(v == 1.0 for _, v in equal)
    refreshed = dict(_history(run.uri, run.mlflow_run_id, "finetune/maps_refreshed"))
    assert refreshed[0] == 420  # the whole train split of the sample (600 - 120 val - 60 test), each image once
    metrics = MlflowClient(run.uri).get_run(run.mlflow_run_id).data.metrics
    assert 0.0 <= metrics["final_val/accuracy"] <= 1.0
    assert 0.0 <= metrics["final_test/accuracy"] <= 1.0  # the sample has a test split, evaluated once
    # Where the refreshed maps put their mass (tissue or background), measured at every refresh.
    lift = _history(run.uri, run.mlflow_run_id, "pretrain/map_foreground_lift")
    assert {s for s, _ in lift} == {1, 2, 3} and all(v > 0 for _, v in lift)
    # The paper's rule from epoch 1 (sam_start=1): the encoder sees 16 of 64 patches, the low-attention ones.
    tokens = dict(_history(run.uri, run.mlflow_run_id, "pretrain/train_tokens_seen"))
    weight = dict(_history(run.uri, run.mlflow_run_id, "pretrain/train_seen_weight"))
    assert set(tokens.values()) == {16.0} and weight[0] == 1.0 and all(weight[e] < 0.99 for e in (1, 2, 3)), weight
    # Fine-tuning by the same rule: 16 of 64 tokens, the low-attention ones, in both epochs.
    ft_tokens = dict(_history(run.uri, run.mlflow_run_id, "finetune/train_tokens_seen"))
    ft_weight = dict(_history(run.uri, run.mlflow_run_id, "finetune/train_seen_weight"))
    assert ft_tokens == {0: 16.0, 1: 16.0} and all(w < 0.99 for w in ft_weight.values()), ft_weight
    artifacts = {a.path for a in MlflowClient(run.uri).list_artifacts(run.mlflow_run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc_curves.png", "plots/attention_overlays.png", "plots/reconstructions.png"} <= artifacts


@pytest.mark.slow
def test_the_registered_version_loads_the_msmae_classifier_and_predicts(train_resumed_run):
    import mlflow

    import msmae
    from pipelines.serve.loading import load_model

    mlflow.set_tracking_uri(train_resumed_run.uri)
    model, names = load_model(f"models:/{MODEL}/1")
    assert isinstance(model, msmae.MSMAEClassifier)
    assert names == ["glioma", "meningioma", "notumor", "pituitary"]
    probs = model(torch.randn(3, 3, 64, 64)).softmax(-1)
    assert probs.shape == (3, 4)
    assert msmae.attention_maps(model, torch.randn(2, 3, 64, 64)).shape == (2, 64)


@pytest.mark.slow
def test_evaluate_command_on_a_raw_image_folder(train_resumed_run, data_sample_btmd, tmp_path):
    import json

    from typer.testing import CliRunner

    from msmae_cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", f"models:/{MODEL}/1", "--data", str(data_sample_btmd),
                                      "--out", str(out), "--tracking-uri", train_resumed_run.uri])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["train"]  # a raw folder is evaluated whole
    assert metrics["num_samples"] == 600
    assert sum(map(sum, metrics["confusion"])) == 600
    assert "macro-F1" in result.output


@pytest.mark.slow
def test_predict_command_writes_every_image_and_flags_unreadable_ones(train_resumed_run, data_sample_btmd, tmp_path):
    import shutil

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from msmae_cli import app

    folder = tmp_path / "incoming"
    shutil.copytree(data_sample_btmd / "glioma", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.parquet"
    result = CliRunner().invoke(app, ["predict", "--model", f"models:/{MODEL}/1", "--input", str(folder),
                                      "--out", str(out), "--tracking-uri", train_resumed_run.uri])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pydict()
    assert len(table["path"]) == 151
    broken = table["path"].index(str(folder / "broken.jpg"))
    assert table["ok"][broken] is False and table["predicted_class"][broken] is None
    assert set(table["predicted_class"]) - {None} <= {"glioma", "meningioma", "notumor", "pituitary"}
    sums = [sum(table[f"prob_{c}"][i] for c in ("glioma", "meningioma", "notumor", "pituitary")) for i in range(151) if i != broken]
    assert all(abs(x - 1) < 1e-4 for x in sums)


@pytest.mark.slow
def test_the_run_ends_with_a_summary_and_logs_its_promotion_health_and_training_curves(train_resumed_run):
    """Issue 27: the last lines are the summary block (run, URL, model URI, checkpoint, artifacts, decision,
    health); the run is named after the dataset and config; per-epoch AUC keys carry class names."""
    from mlflow.tracking import MlflowClient

    run = train_resumed_run
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    out = run.resumed.stdout
    after = out[out.rindex("== summary =="):].strip().splitlines()
    labels = ("== summary ==", "run ", "run URL", "model URI", "promotion", "checkpoint", "pre-trained", "artifacts", "warning", "health")
    block = [line for line in after if line.startswith(labels)]
    print("\n".join(after))  # docs/training.md shows this block
    assert block == after[:len(block)] and len(block) <= 12, after  # nothing of ours after it
    text = "\n".join(block)
    assert f"MLflow run {run.mlflow_run_id}, experiment {MODEL}" in text
    assert f"{run.uri}/#/experiments/" in text and f"/runs/{run.mlflow_run_id}" in text
    assert f"models:/{MODEL}/1" in text and re.search(r"^promotion   (@champion|not promoted)", text, re.M)
    assert re.search(r"^checkpoint  \S+finetune/checkpoint_\d+", text, re.M) and "artifacts   " in text
    assert re.search(r"^(health      no warnings|warning     )", text, re.M)
    client = MlflowClient(run.uri)
    logged = client.get_run(run.mlflow_run_id)
    assert logged.data.tags["mlflow.runName"].startswith("btmd-demo-pretrain-finetune-")
    assert "msmae.promotion" in logged.data.tags and "msmae.health" in logged.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.mlflow_run_id)} | {a.path for a in client.list_artifacts(run.mlflow_run_id, "plots")}
    assert {"promotion.json", "health.json", "plots/training_curves.png"} <= artifacts
    assert "finetune/val_auc_glioma" in logged.data.metrics and "finetune/val_auc_0" not in logged.data.metrics
    assert "pretrain/val_auc_pituitary" in logged.data.metrics


@pytest.mark.slow
def test_resuming_the_finished_run_registers_nothing_new_and_each_epoch_has_one_value(train_resumed_run):
    """Issue 19: `--resume` of a run that finished says so and registers no second version; the epoch the
    killed driver was in when it died, trained again after the resume, kept one value per step."""
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from msmae_cli import app

    run = train_resumed_run
    assert run.resumed.returncode == 0, run.resumed.stderr[-3000:]
    again = CliRunner().invoke(app, [*run.args, "--resume"])  # in-process: it must stop before Ray or MLflow
    assert again.exit_code == 0, again.output
    assert "already finished (registered msmae-e2e version 1)" in again.output and "nothing registered again" in again.output
    assert [v.version for v in MlflowClient(run.uri).search_model_versions(f"name='{MODEL}'")] == ["1"]
    for key in ("pretrain/epoch", "pretrain/train_loss", "finetune/epoch", "finetune/val_macro_f1"):
        steps = [s for s, _ in _history(run.uri, run.mlflow_run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: {steps}"
