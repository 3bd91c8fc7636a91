"""Launch one MSMAE stage as a Ray Train job (``TorchTrainer``) over Ray Data streams."""

from __future__ import annotations

from pathlib import Path

import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as TrainRunConfig
from ray.train.torch import TorchTrainer

from pipelines.data.dataset import IngestedDataset
from pipelines.data.streams import eval_stream, train_stream, unaugmented_train_stream
from pipelines.local_ray import quiet_ray_data
from pipelines.train.worker import StageSpec, train_loop


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


def run_stage(spec: StageSpec, dataset: IngestedDataset, storage_path: Path, name: str, callbacks: list | None = None) -> ray.train.Result:
    """Run one stage to completion (restoring from ``storage_path/name`` when it exists).

    ``callbacks`` go to Ray Train's RunConfig, e.g. Tune's ``TuneReportCallback`` that forwards
    every epoch's report to a sweep's scheduler.
    """
    quiet_ray_data()  # here too: a sweep's trials build their datasets in their own processes
    cfg = spec.config
    size, seed = cfg.data.img_size, cfg.data.seed
    stage_cfg = cfg.pretrain if spec.stage == "pretrain" else cfg.finetune
    per_worker_batch = max(1, stage_cfg.batch_size // cfg.scaling.workers)  # as the worker reads it: no re-batching copies
    datasets = {
        # On GPU workers uint8 images, normalised on the GPU: a quarter of the bytes through the object store and
        # over PCIe. On CPU the stream normalises (measured: uint8 + normalising in the consumer was 0.89x as fast).
        "train": train_stream(dataset, "train", size, seed, batch_size=per_worker_batch, uint8=cfg.scaling.use_gpu),
        "train_plain": unaugmented_train_stream(dataset, "train", size),
        "val": eval_stream(dataset, "val", size),
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
