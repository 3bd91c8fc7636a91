"""`msmae run` end to end against a real local Ray cluster and a real MLflow server on 127.0.0.1."""

from __future__ import annotations

import os
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
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


def _run(source, workdir, uri, overrides=(), fail_at_epoch=None, model_name="msmae-e2e"):
    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    cfg = load_config("demo", [*TINY_RUN, f"tracking.model_name={model_name}", f"tracking.experiment={model_name}", *overrides])
    return run_pipeline(source, cfg, workdir, uri, fail_at_epoch=fail_at_epoch, log=lambda _: None)


def _history(uri, run_id, key):
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_tiny_run_end_to_end_registers_a_champion_that_predicts(ray_local, train_mlflow_server, data_sample_ingested, tmp_path):
    outcome = _run(data_sample_ingested, tmp_path / "work", train_mlflow_server)
    assert outcome.model_version == "1" and outcome.champion
    assert 0.0 <= outcome.val["accuracy"] <= 1.0 and outcome.test is not None  # the sample has a test split
    # Every epoch of both stages was logged, with validation metrics.
    assert [s for s, _ in _history(train_mlflow_server, outcome.mlflow_run_id, "pretrain/val_accuracy")] == [0, 1, 2]
    assert [s for s, _ in _history(train_mlflow_server, outcome.mlflow_run_id, "finetune/val_macro_f1")] == [0, 1]
    # After each refresh every worker held the identical attention table.
    equal = _history(train_mlflow_server, outcome.mlflow_run_id, "pretrain/attention_table_replicas_equal")
    assert [s for s, _ in equal] == [1, 2] and all(v == 1.0 for _, v in equal)
    refreshed = dict(_history(train_mlflow_server, outcome.mlflow_run_id, "finetune/maps_refreshed"))
    assert refreshed[0] == 420  # the whole train split of the sample (600 - 120 val - 60 test), each image once

    import mlflow

    mlflow.set_tracking_uri(train_mlflow_server)
    from pipelines.tracking import load_champion

    model = load_champion("models:/msmae-e2e@champion")
    probs = model(torch.randn(3, 3, 64, 64)).softmax(-1)
    assert probs.shape == (3, 4)
    import msmae

    assert msmae.attention_maps(model, torch.randn(2, 3, 64, 64)).shape == (2, 64)


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_checkpoint_and_every_epoch_is_logged(ray_local, train_mlflow_server, data_sample_ingested, tmp_path):
    outcome = _run(data_sample_ingested, tmp_path / "work", train_mlflow_server, fail_at_epoch=1, model_name="msmae-fault")
    epochs = [s for s, _ in _history(train_mlflow_server, outcome.mlflow_run_id, "pretrain/epoch")]
    assert sorted(set(epochs)) == [0, 1, 2]
    assert outcome.model_version == "1"
