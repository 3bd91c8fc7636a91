"""`msmae run` end to end against a real local Ray cluster and a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TINY_RUN = [
    "pretrain.epochs=3", "pretrain.warmup_epochs=1", "pretrain.masking.sam_start=1", "pretrain.masking.refresh_every=1",
    "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.masking.refresh_every=1",
    "pretrain.batch_size=64", "finetune.batch_size=64", "checkpoint.max_failures=1",
]


def _run(source, workdir, uri, overrides=(), fail_at_epoch=None, model_name="msmae-e2e"):
    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    cfg = load_config("demo", [*TINY_RUN, f"tracking.model_name={model_name}", f"tracking.experiment={model_name}", *overrides])
    return run_pipeline(source, cfg, workdir, uri, fail_at_epoch=fail_at_epoch, log=lambda _: None)


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def train_tiny_run(ray_local, train_mlflow_server, data_sample_ingested, tmp_path_factory):
    """One tiny pretrain -> finetune -> register run shared by the tests below."""
    return _run(data_sample_ingested, tmp_path_factory.mktemp("work"), train_mlflow_server)


@pytest.mark.slow
def test_tiny_run_logs_every_epoch_and_registers_a_champion(train_tiny_run, train_mlflow_server):
    outcome, uri = train_tiny_run, train_mlflow_server
    assert outcome.model_version == "1" and outcome.champion
    assert 0.0 <= outcome.val["accuracy"] <= 1.0 and outcome.test is not None  # the sample has a test split
    assert [s for s, _ in _history(uri, outcome.mlflow_run_id, "pretrain/val_accuracy")] == [0, 1, 2]
    assert [s for s, _ in _history(uri, outcome.mlflow_run_id, "finetune/val_macro_f1")] == [0, 1]
    # After each refresh every worker held the identical attention table.
    equal = _history(uri, outcome.mlflow_run_id, "pretrain/attention_table_replicas_equal")
    assert [s for s, _ in equal] == [1, 2] and all(v == 1.0 for _, v in equal)
    refreshed = dict(_history(uri, outcome.mlflow_run_id, "finetune/maps_refreshed"))
    assert refreshed[0] == 420  # the whole train split of the sample (600 - 120 val - 60 test), each image once

    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(outcome.mlflow_run_id, "plots")}
    assert {"plots/confusion_matrix.png", "plots/roc_curves.png", "plots/attention_overlays.png", "plots/reconstructions.png"} <= artifacts


@pytest.mark.slow
def test_champion_alias_loads_the_msmae_classifier_and_predicts(train_tiny_run, train_mlflow_server):
    import mlflow

    import msmae
    from pipelines.evaluate import load_model

    mlflow.set_tracking_uri(train_mlflow_server)
    model, names = load_model("models:/msmae-e2e@champion")
    assert isinstance(model, msmae.MSMAEClassifier)
    assert names == ["glioma", "meningioma", "notumor", "pituitary"]
    probs = model(torch.randn(3, 3, 64, 64)).softmax(-1)
    assert probs.shape == (3, 4)
    assert msmae.attention_maps(model, torch.randn(2, 3, 64, 64)).shape == (2, 64)


@pytest.mark.slow
def test_evaluate_command_on_a_raw_image_folder(train_tiny_run, train_mlflow_server, data_sample_btmd, tmp_path):
    import json

    from typer.testing import CliRunner

    from pipelines.cli import app

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", "--model", "models:/msmae-e2e@champion", "--data", str(data_sample_btmd),
                                      "--out", str(out), "--tracking-uri", train_mlflow_server])
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["train"]  # a raw folder is evaluated whole
    assert metrics["num_samples"] == 600
    assert sum(map(sum, metrics["confusion"])) == 600
    assert "macro-F1" in result.output


@pytest.mark.slow
def test_predict_command_writes_every_image_and_flags_unreadable_ones(train_tiny_run, train_mlflow_server, data_sample_btmd, tmp_path):
    import shutil

    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from pipelines.cli import app

    folder = tmp_path / "incoming"
    shutil.copytree(data_sample_btmd / "glioma", folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "preds.parquet"
    result = CliRunner().invoke(app, ["predict", "--model", "models:/msmae-e2e@champion", "--input", str(folder),
                                      "--out", str(out), "--tracking-uri", train_mlflow_server])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).to_pydict()
    assert len(table["path"]) == 151
    broken = table["path"].index(str(folder / "broken.jpg"))
    assert table["ok"][broken] is False and table["predicted_class"][broken] is None
    assert set(table["predicted_class"]) - {None} <= {"glioma", "meningioma", "notumor", "pituitary"}
    sums = [sum(table[f"prob_{c}"][i] for c in ("glioma", "meningioma", "notumor", "pituitary")) for i in range(151) if i != broken]
    assert all(abs(x - 1) < 1e-4 for x in sums)


def _checkpoint_epochs(storage: Path, stage: str) -> list[int]:
    """Epochs of the checkpoints Ray has persisted for a stage (read from each checkpoint's meta.json)."""
    epochs = []
    for meta in storage.glob(f"*-{stage}/checkpoint_*/meta.json"):
        try:
            epochs.append(int(json.loads(meta.read_text())["metrics"]["epoch"]))
        except (ValueError, KeyError):  # being written right now
            continue
    return sorted(epochs)


@pytest.mark.slow
def test_a_killed_worker_and_a_killed_driver_both_resume_and_every_epoch_is_logged(train_mlflow_server, data_sample_ingested, ray_local_env, tmp_path):
    """One real `msmae run` process: a worker raises at epoch 1 (Ray restarts the group from the
    checkpoint), then the driver is killed outright after epoch 2's checkpoint; `msmae run --resume`
    finishes the same run from there, attention table included."""
    work, uri = tmp_path / "work", train_mlflow_server
    msmae_bin = str(Path(sys.executable).with_name("msmae"))
    sets = [a for kv in [*TINY_RUN, "pretrain.epochs=4", "tracking.model_name=msmae-resume", "tracking.experiment=msmae-resume"] for a in ("--set", kv)]
    cmd = [msmae_bin, "run", str(data_sample_ingested), "--config", "demo", *sets, "--workdir", str(work), "--tracking-uri", uri]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([*cmd, "--fail-at-epoch", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=ray_local_env)
    deadline = time.time() + 600
    while 2 not in _checkpoint_epochs(work / "storage", "pretrain"):
        assert proc.poll() is None, f"run ended before it could be killed; see {tmp_path / 'first.log'}"
        assert time.time() < deadline, "no checkpoint of pre-training epoch 2 within 10 minutes"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies without any clean-up; the cluster lives on
    proc.wait(timeout=30)
    state = json.loads((work / "last_run.json").read_text())

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900, env=ray_local_env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "registered msmae-resume version 1" in resumed.stdout
    epochs = [s for s, _ in _history(uri, state["mlflow_run_id"], "pretrain/epoch")]
    assert sorted(set(epochs)) == [0, 1, 2, 3]
    assert epochs.count(0) == 1, "the resumed run trained epoch 0 again instead of restoring its checkpoint"
    assert [s for s, _ in _history(uri, state["mlflow_run_id"], "finetune/epoch")] == [0, 1]
    # The restored table is the one refreshed at epoch 1 (sam_start=1, refresh_every=1 → refreshed again at 3).
    assert {s for s, _ in _history(uri, state["mlflow_run_id"], "pretrain/maps_refreshed") if _ > 0} >= {3}
