"""Actor pools of scoring models on the cluster: how big, and the evaluation scorer that runs in them.

``msmae predict`` and ``msmae evaluate`` of a large split both score on a pool sized to the
cluster (one actor per GPU, or one per 4 CPUs); the sizing lives here so both agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

DEFAULT_MAX_FILE_BYTES = 1 << 30


@dataclass(frozen=True)
class PredictSettings:
    """How the job is spread over the cluster. ``None``: sized to the cluster when the job starts.

    ``actors``: scoring actors (fixed pool). Default: an autoscaling pool of 1 up to one per GPU
    (``gpus_per_actor`` each) on a GPU cluster, else one per 4 logical CPUs (the rest decode).
    ``gpus_per_actor``: default 1 when the cluster has GPUs, else 0 (CPU scoring).
    """

    batch_size: int = 64
    actors: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float = 1.0
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    rows_per_file: int = 10_000  # Parquet shard size (rows); fewer, larger files than one per block

    def __post_init__(self) -> None:
        for name in ("batch_size", "actors", "rows_per_file", "max_file_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"predict {name.replace('_', '-')} must be >= 1, got {value}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"predict gpus-per-actor must be >= 0, got {self.gpus_per_actor}")


@dataclass(frozen=True)
class Pool:
    """The actor pool a job got: (min, max) actors and each actor's resources."""

    min_actors: int
    max_actors: int
    gpus_per_actor: float
    cpus_per_actor: float


def pool_for_cluster(settings: PredictSettings, resources: dict[str, float] | None = None) -> Pool:
    """The scoring pool for the cluster's resources (``ray.cluster_resources()`` by default)."""
    resources = ray.cluster_resources() if resources is None else resources
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    per_gpu = settings.gpus_per_actor if settings.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    if settings.actors is not None:
        return Pool(settings.actors, settings.actors, per_gpu, settings.cpus_per_actor)
    most = int(gpus // per_gpu) if per_gpu > 0 else int(cpus // 4)
    return Pool(1, max(1, most), per_gpu, settings.cpus_per_actor)


# Evaluation of a split this large is scored by an actor pool, not by the driver's own model.
SCORE_ON_ACTORS_FROM = 20_000


def score_on_actors(num_images: int) -> bool:
    """Should ``msmae evaluate`` score on the cluster's actors? For a large split, or when the cluster has
    GPUs that the driver does not (a CPU head node)."""
    return num_images >= SCORE_ON_ACTORS_FROM or (ray.cluster_resources().get("GPU", 0) >= 1 and not torch.cuda.is_available())


class EvalBatchScorer:
    """Ray Data callable class: eval-stream batches (normalised images) → the model's probabilities, with the labels."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import msmae

        images = torch.from_numpy(np.asarray(batch["image"])).to(self.device, non_blocking=True)
        return {"probs": msmae.predict_probs(self.model, images).float().cpu().numpy(), "label": np.asarray(batch["label"]),
                "index": np.asarray(batch["index"])}


def cluster_probabilities(ds: ray.data.Dataset, model: torch.nn.Module, batch_size: int = 64,
                          progress=None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Probabilities ``[N, C]``, labels ``[N]`` and dataset indices ``[N]`` of an eval stream, scored by an actor pool
    sized to the cluster (as ``predict``'s). Only those N·(C + 2) numbers reach the driver: what the metrics need.
    ``progress`` (a ``pipelines.progress.Progress``) counts the rows as they come back."""
    pool = pool_for_cluster(PredictSettings(batch_size=batch_size))
    scored = ds.map_batches(
        EvalBatchScorer, fn_constructor_args=(model.cpu(),), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.gpus_per_actor, num_cpus=pool.cpus_per_actor,
    )
    probs, labels, index = [], [], []
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        probs.append(batch["probs"])
        labels.append(batch["label"])
        index.append(batch["index"])
        if progress is not None:
            progress.update(len(batch["label"]))
    if not probs:
        raise ValueError("evaluation got no batches: is the split empty?")
    return torch.from_numpy(np.concatenate(probs)), torch.from_numpy(np.concatenate(labels).astype(np.int64)), np.concatenate(index)
