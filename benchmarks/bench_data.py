"""Training-stream throughput: Ray Data vs a torch DataLoader doing the same work.

Both sides run the exact same per-batch function (`pipelines.data.transforms.augment_batch`: decode,
RandomResizedCrop 0.2–1 bicubic, flip, normalise, crop box) over the same train split of an
ingested dataset, with the same number of CPU workers (`--workers`: DataLoader processes /
Ray Data map tasks in flight) and the same batch size. Each side runs `--epochs` passes, alternating
so both see the same background load; the first includes start-up (process spawn, imports).
Every Ray Data epoch is a new streaming execution, so each one's first batch waits for that
execution to start (and for a whole decode task); the table shows both sides' first-batch times.

    .venv/bin/python benchmarks/bench_data.py            # BTMD Training if present, else the sample
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`
BTMD = REPO.parent / "shared/datasets/btmd/Training"
SAMPLE = REPO / "data/sample/btmd"
PREFETCH_PER_WORKER = 2  # torch's default prefetch_factor


class ShardBatches(torch.utils.data.Dataset):
    """Map-style dataset over the split's rows; one item = one batch of row positions."""

    def __init__(self, files: list[Path], size: int, seed: int, uint8: bool = False) -> None:
        table = pa.concat_tables([pq.read_table(f, columns=["image", "label", "index"]) for f in files])
        self.images = np.array(table.column("image").to_pylist(), dtype=object)
        self.labels = table.column("label").to_numpy()
        self.indices = table.column("index").to_numpy()
        self.size, self.seed, self.uint8 = size, seed, uint8

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, rows: list[int]) -> dict[str, np.ndarray]:
        from pipelines.data.transforms import augment_batch

        batch = {"image": self.images[rows], "label": self.labels[rows], "index": self.indices[rows]}
        return augment_batch(batch, size=self.size, seed=self.seed, repeatable=False, uint8=self.uint8)


def consume(batch: dict, uint8: bool) -> int:
    """What a training step gets: float32 normalised images (a uint8 stream is normalised here, in the consumer)."""
    image = batch["image"] if torch.is_tensor(batch["image"]) else torch.as_tensor(batch["image"])
    if uint8:
        from pipelines.data.streams import normalise_images

        image = normalise_images(image)
    assert image.dtype == torch.float32
    return len(batch["index"])


def torch_pass(files: list[Path], size: int, workers: int, batch: int, uint8: bool = False) -> Callable[[], Iterator[int]]:
    """A DataLoader with persistent worker processes; each call runs one epoch."""
    ds = ShardBatches(files, size, seed=0, uint8=uint8)
    # shuffled, as the training stream is (it shuffles rows on every pass)
    sampler = BatchSampler(RandomSampler(range(len(ds))), batch_size=batch, drop_last=False)
    loader = DataLoader(ds, sampler=sampler, batch_size=None, num_workers=workers, persistent_workers=True,
                        prefetch_factor=PREFETCH_PER_WORKER)
    return lambda: (consume(b, uint8) for b in loader)


def ray_pass(data_dir: Path, size: int, workers: int, batch: int, uint8: bool = False) -> Callable[[], Iterator[int]]:
    """The training stream limited to `workers` concurrent map tasks; each call runs one epoch."""
    import ray

    from pipelines.data.dataset import IngestedDataset
    from pipelines.data.streams import train_stream

    if not ray.is_initialized():
        # logical CPUs > cores: read tasks need free slots beside the `workers` map tasks (see STACK.md)
        ray.init(num_cpus=workers + 2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = train_stream(IngestedDataset.load(data_dir), "train", size, seed=0, batch_size=batch, concurrency=workers, uint8=uint8)
    # as many batches prefetched as the DataLoader keeps in flight (workers × prefetch_factor)
    prefetch = workers * PREFETCH_PER_WORKER
    return lambda: (consume(b, uint8) for b in ds.iter_torch_batches(batch_size=batch, prefetch_batches=prefetch))


@dataclass(frozen=True)
class Pass:
    """One epoch of one side: its images/s, and how long its first batch took (a Ray Data epoch is a
    new streaming execution, whose start-up the first batch waits for; DataLoader workers persist)."""

    images: int
    seconds: float
    first_batch_seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def timed(fn: Callable[[], Iterator[int]]) -> Pass:
    t = time.perf_counter()
    sizes = fn()
    n = next(sizes)
    first = time.perf_counter() - t
    n += sum(sizes)
    return Pass(n, time.perf_counter() - t, first)


def add_stream_arguments(ap: argparse.ArgumentParser, epochs: int) -> None:
    """The data, image size, workers, batch and epochs of a training-stream benchmark (this one and bench_stream_epochs.py)."""
    ap.add_argument("--src", type=Path, default=BTMD if BTMD.is_dir() else SAMPLE, help="ImageFolder to ingest")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "msmae_bench_data", help="ingest output (reused)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_arguments(ap, epochs=3)
    ap.add_argument("--formats", nargs="+", choices=["float32", "uint8"], default=["float32", "uint8"],
                    help="the stream's image dtype: float32 normalised in the map, or uint8 normalised by the consumer")
    args = ap.parse_args()

    from pipelines.data.dataset import IngestedDataset
    from pipelines.data.ingest import IngestOptions, ingest

    data_dir = args.work / args.src.name
    res = ingest(args.src, data_dir, IngestOptions(), progress=False, log=lambda _: None)
    files = IngestedDataset.load(data_dir).shard_files("train")
    n = res.summary["counts"]["train"]["total"]
    print(f"train split of {args.src}: {n} images, S={args.size}, batch {args.batch}, {args.workers} CPU workers each")

    torch.set_num_threads(1)
    runs = {}
    for fmt in args.formats:
        runs[fmt] = (torch_pass(files, args.size, args.workers, args.batch, fmt == "uint8"),
                     ray_pass(data_dir, args.size, args.workers, args.batch, fmt == "uint8"))
    # Epochs alternate (torch, Ray, torch, Ray; format by format) so all see the same background load.
    passes: dict[str, tuple[list[Pass], list[Pass]]] = {fmt: ([], []) for fmt in runs}
    try:
        for _ in range(args.epochs):
            for fmt, (run_torch, run_ray) in runs.items():
                passes[fmt][0].append(timed(run_torch))
                passes[fmt][1].append(timed(run_ray))
    finally:
        import ray

        ray.shutdown()

    for fmt, (torch_passes, ray_passes) in passes.items():
        print(f"\nimage {fmt}{' (normalised in the consumer, both sides)' if fmt == 'uint8' else ' (normalised in the workers)'}")
        print("| epoch | torch DataLoader (img/s) | Ray Data (img/s) | Ray / torch | first batch: torch (s) | first batch: Ray (s) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for e, (t, r) in enumerate(zip(torch_passes, ray_passes, strict=True), start=1):
            print(f"| {e} | {t.rate:.0f} | {r.rate:.0f} | {r.rate / t.rate:.2f}× | {t.first_batch_seconds:.2f} | {r.first_batch_seconds:.2f} |")
        if args.epochs > 1:
            steady_t, steady_r = torch_passes[1:], ray_passes[1:]
            t, r = float(np.mean([p.rate for p in steady_t])), float(np.mean([p.rate for p in steady_r]))
            ft, fr = float(np.mean([p.first_batch_seconds for p in steady_t])), float(np.mean([p.first_batch_seconds for p in steady_r]))
            print(f"| 2–{args.epochs} mean | {t:.0f} | {r:.0f} | {r / t:.2f}× | {ft:.2f} | {fr:.2f} |")
            # each epoch pair ran back to back, so its ratio cancels slow drifts in background load
            ratios = [r.rate / t.rate for t, r in zip(steady_t, steady_r, strict=True)]
            print(f"median of per-epoch ratios (epochs 2–{args.epochs}): {float(np.median(ratios)):.2f}×")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
