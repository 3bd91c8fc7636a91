"""Shared fixtures. Data fixtures are prefixed `data_` / `ray_`; add yours with your own prefix."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_BTMD = REPO / "data" / "sample" / "btmd"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``image`` (a cold container build: root, podman, ~25 GB, 20-30 min) run only when
    asked for by name in ``-m`` (``pytest -m image``); the default suite deselects them."""
    if "image" in (config.getoption("markexpr", "") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("image") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("image") is not None])
        items[:] = keep


@pytest.fixture(autouse=True)
def mlflow_uri_isolated(monkeypatch: pytest.MonkeyPatch):
    """Each test starts with MLflow pointing nowhere in particular, and leaves it so.

    ``mlflow.set_tracking_uri`` (and ``--tracking-uri`` of a command run in-process) also sets
    ``$MLFLOW_TRACKING_URI``, which every later command would follow — to a server a finished
    test has already stopped."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored (or removed again) at teardown
    yield
    if "mlflow" in sys.modules:
        from mlflow.tracking._tracking_service import utils

        utils._tracking_uri = None


@pytest.fixture(scope="session")
def data_sample_btmd() -> Path:
    """The bundled BTMD sample (data/sample/btmd); read-only, never write into it."""
    if not SAMPLE_BTMD.is_dir():
        pytest.fail(f"{SAMPLE_BTMD} missing: regenerate it with scripts/make_sample.py")
    return SAMPLE_BTMD


@pytest.fixture(scope="session")
def data_sample_ingested(tmp_path_factory: pytest.TempPathFactory, data_sample_btmd: Path) -> Path:
    """The bundled sample ingested once per session (val 0.2, test 0.1, seed 0)."""
    from pipelines.data.ingest import IngestOptions, ingest

    out = tmp_path_factory.mktemp("sample_ingest")
    ingest(data_sample_btmd, out, IngestOptions(val=0.2, test=0.1, seed=0, workers=1), progress=False, log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster per test session, on loopback.

    6 logical CPUs on a 2-core machine: Ray Data's read tasks need free CPU slots beside the
    Train workers (two concurrent sweep trials included), or a run can hang waiting for resources.
    Tests that start `msmae` in a subprocess connect it here (``ray_local_env``): one cluster
    per machine is what Ray's own helpers expect.
    """
    import ray

    from pipelines.local_ray import LOOPBACK_NODE_IP

    if ray.is_initialized():  # another session fixture started it: share, and leave shutdown to it
        yield ray
        return
    tmp = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ray.init(
        num_cpus=6,
        include_dashboard=True,  # Ray Train's clean-up actor polls the state API the dashboard serves
        dashboard_host="127.0.0.1",
        _node_ip_address=LOOPBACK_NODE_IP,
        _temp_dir=tmp,
        object_store_memory=512 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local_env(ray_local) -> dict[str, str]:
    """Environment for a subprocess driver (`msmae run`, `msmae tune`) to join the session's cluster."""
    return dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def train_mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, local artifacts) on 127.0.0.1, one per session.

    Its start-up costs ~15 s on 2 cores, so the end-to-end modules share it; each keeps to its own
    experiment and model name, so none sees another's runs."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"), start_new_session=True,
        # No job runner: its 7 queue consumers (MLflow's GenAI jobs, which no test uses) are 8 more Python
        # processes importing MLflow beside the server, which doubled its start-up on 2 cores.
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.25)
    else:
        proc.kill()
        pytest.fail(f"MLflow server did not start; see {root / 'server.log'}")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # the server's workers ignore a polite stop now and then (15 s were waited out)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
