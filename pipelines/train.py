"""Launch one MSMAE stage as a Ray Train job (``TorchTrainer``) over Ray Data streams."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray
import ray.train
from joblib import cpu_count
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from pipelines.config import RunConfig
from pipelines.data import eval_stream, train_stream, unaugmented_train_stream
from pipelines.worker import StageSpec, train_loop


class StageDataConfig(DataConfig):
    """``train`` is split equally (every DDP worker must take the same number of steps);
    ``val`` and ``train_plain`` are split so that every row is read exactly once —
    Ray's equal split would drop rows, and a validation set must not lose images."""

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            if name == "train":
                parts = super().configure({name: ds}, world_size, worker_handles, worker_node_ids, **kwargs)
                for i, part in enumerate(parts):
                    output[i].update(part)
                continue
            ds = ds.copy(ds)
            ds.set_name(name)
            for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                output[i][name] = split
        return output


def dataset_info(data_dir: Path) -> dict:
    """Classes and split sizes recorded by ``msmae ingest``."""
    info_path = Path(data_dir) / "dataset.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: run `msmae ingest SRC --out {data_dir}` first")
    return json.loads(info_path.read_text())


def class_names(info: dict) -> list[str]:
    classes = info["classes"]  # name -> id
    return [name for name, _ in sorted(classes.items(), key=lambda kv: kv[1])]


def split_size(info: dict, split: str) -> int:
    counts = info["counts"].get(split, {})
    return int(counts.get("total", sum(counts.values())))


# Ray rewrites 127.0.0.1 to the machine's network address, so a local Ray would listen on the
# network; on Linux all of 127/8 is loopback, and 127.0.0.2 keeps it there. (Elsewhere: Ray's default.)
LOOPBACK_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray on loopback.

    Locally Ray gets more logical CPUs than the machine has cores: two Train workers of one
    CPU each would otherwise leave nothing for Ray Data's decode tasks and hang.
    """
    _quiet_ray_data()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    cpus = num_cpus or max(4, cpu_count() * 2)
    # The dashboard serves Ray's state API, which Ray Train's clean-up actor polls; bound to
    # loopback on a port chosen here, so the actor can be told where it is (left to itself it
    # scans the machine for Ray clusters and fails when it finds more than one).
    dashboard_port = _free_port()
    ray.init(
        address="local", num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dashboard_port,
        log_to_driver=True, _node_ip_address=LOOPBACK_NODE_IP,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}"}},
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quiet_ray_data() -> None:
    """Ray Data's per-operator progress output drowns the epoch lines; keep it off."""
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False  # its plan, per dataset and epoch, in every split coordinator
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def run_stage(
    spec: StageSpec, cfg: RunConfig, data_dir: Path, storage_path: Path, name: str, callbacks: list | None = None,
) -> ray.train.Result:
    """Run one stage to completion (restoring from ``storage_path/name`` when it exists).

    ``callbacks`` go to Ray Train's RunConfig, e.g. Tune's ``TuneReportCallback`` that forwards
    every epoch's report to a sweep's scheduler.
    """
    _quiet_ray_data()  # here too: a sweep's trials build their datasets in their own processes
    size, seed = cfg.data.img_size, cfg.data.seed
    datasets = {
        "train": train_stream(data_dir, "train", size, seed),
        "train_plain": unaugmented_train_stream(data_dir, "train", size),
        "val": eval_stream(data_dir, "val", size),
    }
    scaling = ScalingConfig(
        num_workers=cfg.scaling.workers,
        use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.worker_resources},
    )
    run_config = TrainRunConfig(
        name=name,
        storage_path=str(storage_path),
        failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.checkpoint.keep,
            checkpoint_score_attribute=cfg.checkpoint.metric if spec.stage == "finetune" else "epoch",
            checkpoint_score_order="max",
        ),
        logging_config=LoggingConfig(log_level="WARNING"),  # per-report INFO lines would drown the epoch lines
        callbacks=callbacks,
    )
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec},
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=StageDataConfig(),
    )
    return trainer.fit()
