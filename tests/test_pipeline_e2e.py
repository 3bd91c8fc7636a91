"""`msmae run` end to end against a real local Ray cluster and a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

TINY_RUN = [
    "pretrain.epochs=3", "pretrain.warmup_epochs=1", "pretrain.masking.sam_start=1", "pretrain.masking.refresh_every=1",
    "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.masking.refresh_every=1",
    "pretrain.batch_size=64", "finetune.batch_size=64", "checkpoint.max_failures=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def train_mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifacts) on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"MLflow server did not start; see {root / 'server.log'}")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:  # the server's workers ignore a polite stop now and then
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


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


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_every_epoch_is_logged(ray_local, train_mlflow_server, data_sample_ingested, tmp_path):
    outcome = _run(data_sample_ingested, tmp_path / "work", train_mlflow_server, fail_at_epoch=1, model_name="msmae-fault")
    epochs = [s for s, _ in _history(train_mlflow_server, outcome.mlflow_run_id, "pretrain/epoch")]
    assert sorted(set(epochs)) == [0, 1, 2]
    assert outcome.model_version == "1"
