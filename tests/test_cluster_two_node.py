"""The multi-node path on one machine, for real: what a KubeRay RayJob does, without Kubernetes.

A Ray head and a second Ray node are started with ``ray start`` on two loopback addresses
(their own temp dirs and ports, token authentication on), an MLflow server runs on 127.0.0.1
beside them, and ``msmae run`` is submitted with ``ray job submit`` and a runtime environment,
as the RayJob in ``cluster/jobs/rayjob-run.yaml`` has KubeRay submit it to its cluster. The
working folder is one local path both nodes see, standing in for the cluster's shared volume.

Each node offers one ``train_slot`` resource and the run asks for one per Train worker, so the
two workers can only run on two different nodes; the test checks that they did (in Ray's
actor table and in the run's ``worker_nodes`` metric), that the job succeeded, and that the
model was registered. The nodes are stopped by their process ids, never with ``ray stop``,
which would also stop every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_pipeline_e2e import TINY_RUN

BIN = Path(sys.executable).parent
RAY, MSMAE = BIN / "ray", BIN / "msmae"
MODEL_NAME = "msmae-two-node"
# Two loopback addresses, one per node, like two machines on a private network. Not 127.0.0.1:
# `ray start` replaces exactly that address (and "localhost") with the machine's outward one.
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
# The end-to-end tests' tiny run cut to one epoch per stage, at 32 px (4 x 4 tokens, a quarter
# of the demo's compute; SAM still keeps 4 tokens): this test is about placement, not learning.
# The released code's rule (uniform draw) in both stages, fine-tuning switching to every token for
# its second epoch: the rules the single-node run does not use, on real workers across two nodes.
TWO_NODE_RUN = [*TINY_RUN, "pretrain.epochs=1", "finetune.epochs=2", "data.img_size=32", "pretrain.masking.sam_start=0",
                "pretrain.masking.strategy=uniform", "finetune.masking.strategy=uniform", "finetune.masking.all_tokens_from=0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ClusterNode:
    """One ``ray start --block`` process and everything it started."""

    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` (it stops its node), then SIGKILL to whatever of its
        process tree is left; Ray's workers run in sessions of their own, so the tree is
        collected by parent links, never by name."""
        tree = _descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.5)
        for pid in tree:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _descendants(root: int) -> list[int]:
    """Process ids below ``root`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class TwoNodeCluster:
    head: ClusterNode
    worker: ClusterNode
    dashboard: str  # the job server address, as `ray job submit --address` takes it
    env: dict[str, str]  # every ray command must carry the same auth settings

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def job_status(self, submission_id: str) -> str:
        """``SUCCEEDED``, ``FAILED``, ...: the job server's record of the submission (REST, with the token)."""
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{submission_id}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["status"]


def _start_node(ip: str, args: list[str], temp_dir: Path, env: dict[str, str], timeout: float = 120) -> ClusterNode:
    """``ray start --block`` in its own process group; returns once the node has joined.

    One retry with fresh ports: on a loaded 2-core machine the node's dashboard agent can miss
    the raylet's start-up deadline, and Ray then gives up on the whole node.
    """
    for attempt in (1, 2):
        log = temp_dir.with_name(f"{temp_dir.name}-{attempt}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [str(RAY), "start", "--block", "--node-ip-address", ip, "--temp-dir", str(temp_dir),
                 "--disable-usage-stats", *args, *_node_ports()],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        node = ClusterNode(proc, temp_dir, log)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and "Ray runtime started" not in log.read_text():
            time.sleep(0.5)
        if proc.poll() is None and "Ray runtime started" in log.read_text():
            return node
        node.stop()
    pytest.fail(f"Ray node {ip} did not start (twice); the last attempt said:\n{log.read_text()[-3000:]}")


def _node_ports() -> list[str]:
    """Every port a node opens, chosen free: two nodes on one machine must not share any."""
    return [arg for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
            for arg in (flag, str(_free_port()))]


@pytest.fixture(scope="module")
def cluster_two_nodes() -> Iterator[TwoNodeCluster]:
    """A Ray head and one more node on loopback addresses, each with 3 logical CPUs and one train slot.

    3 logical CPUs per node on a 2-core machine: one Train worker plus Ray Data's read and
    decode tasks need free slots, or the run waits for resources forever.
    """
    root = Path(tempfile.mkdtemp(prefix="ray2n_", dir="/tmp"))  # short: Ray's socket paths have a length limit
    gcs, dashboard = _free_port(), _free_port()
    env = {
        **os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
        # Ray Train's helpers query the state API without an address and would otherwise refuse
        # to choose when the machine runs other Ray instances too (another test's, another user's).
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard}",
    }
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "3", "--resources", json.dumps({"train_slot": 1}), "--object-store-memory", str(300 * 2**20)]

    head = _start_node(HEAD_IP, ["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                                 "--ray-client-server-port", str(_free_port()), *common], root / "head", env)
    try:
        worker = _start_node(WORKER_IP, ["--address", f"{HEAD_IP}:{gcs}", *common], root / "worker", env)
    except BaseException:
        head.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    cluster = TwoNodeCluster(head, worker, f"http://127.0.0.1:{dashboard}", env)
    try:
        yield cluster
    finally:
        # Both nodes at once: each stop waits for its node's processes to exit (tens of seconds on 2 cores).
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(ClusterNode.stop, (worker, head)))
        shutil.rmtree(root, ignore_errors=True)


def _alive_nodes(cluster: TwoNodeCluster) -> list[dict]:
    listed = cluster.ray("list", "nodes", "--address", cluster.dashboard, "--format", "json", "--filter", "state=ALIVE")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_msmae_run_submitted_as_a_ray_job_trains_on_both_nodes(cluster_two_nodes, train_mlflow_server, data_sample_btmd, tmp_path):
    cluster, uri = cluster_two_nodes, train_mlflow_server
    nodes = _alive_nodes(cluster)
    assert sorted(n["node_ip"] for n in nodes) == [HEAD_IP, WORKER_IP]
    with pytest.raises(urllib.error.HTTPError) as refused:  # token authentication is on: no token, no jobs
        urllib.request.urlopen(f"{cluster.dashboard}/api/jobs/", timeout=30)
    assert refused.value.code == 401

    shared = tmp_path / "shared"  # the cluster's shared volume: data, checkpoints, Ray Train storage
    overrides = [*TWO_NODE_RUN, "scaling.worker_resources.train_slot=1",
                 f"tracking.model_name={MODEL_NAME}", f"tracking.experiment={MODEL_NAME}"]
    entrypoint = [str(MSMAE), "run", "--data", str(data_sample_btmd), "--config", "demo", "--workdir", str(shared / "work"),
                  "--tracking-uri", uri, "--train-workers", "2", *[a for o in overrides for a in ("--set", o)]]
    # As the RayJob's runtimeEnvYAML: environment only, no working_dir upload (the package is
    # installed on every node, as it is in the container image).
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    submission_id = f"msmae-run-{secrets.token_hex(4)}"
    started = time.time()
    submitted = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
        "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint, timeout=1000,
    )
    seconds = time.time() - started
    logs = cluster.ray("job", "logs", submission_id, "--address", cluster.dashboard).stdout
    status = cluster.job_status(submission_id)
    assert status == "SUCCEEDED", f"job {status}; its log ends:\n{logs[-6000:]}\n{submitted.stderr[-2000:]}"
    assert f"registered {MODEL_NAME} version 1" in logs
    print(f"two-node job: {seconds:.0f} s from submission to success")

    # Ray's own record: the Train workers of both stages, one on each node.
    actors = cluster.ray("list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail",
                         "--filter", "class_name=RayTrainWorker", "--limit", "1000")
    assert actors.returncode == 0, actors.stderr
    train_workers = json.loads(actors.stdout)
    assert len(train_workers) >= 4  # two stages x two workers
    assert {a["node_id"] for a in train_workers} == {n["node_id"] for n in nodes}

    # The run's own record: every epoch's worker group spanned two nodes, and the model is registered.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == "1"
    for key in ("pretrain/worker_nodes", "finetune/worker_nodes"):
        history = client.get_metric_history(version.run_id, key)
        assert history and all(m.value == 2 for m in history), (key, history)
    # 32 px, 8 px patches: 16 patches. The uniform draw shows the encoder 4 of them at random (draw
    # weight 1: no preference); fine-tuning's second epoch, after the switch, shows all 16.
    seen = {key: [m.value for m in sorted(client.get_metric_history(version.run_id, key), key=lambda m: m.step)] for key in (
        "pretrain/train_tokens_seen", "pretrain/train_seen_weight", "finetune/train_tokens_seen", "finetune/train_seen_weight")}
    assert seen == {"pretrain/train_tokens_seen": [4.0], "pretrain/train_seen_weight": [1.0],
                    "finetune/train_tokens_seen": [4.0, 16.0], "finetune/train_seen_weight": [1.0, 1.0]}, seen
    run = client.get_run(version.run_id)
    assert run.data.params["scaling.worker_resources.train_slot"] == "1.0"
    assert (shared / "work" / "storage").is_dir()  # checkpoints went to the shared path
