"""What a new Ray Data execution per epoch costs: the training stream as the project runs it
(one streaming execution per epoch) vs one execution that streams every epoch back to back.

Both run the same decode work (`pipelines.data.transforms.augment_batch`, tasks of
`pipelines.data.streams.rows_per_task(batch, rows)` rows, at most `--workers` at a time) over the same
ingested train split, each epoch a fresh permutation of all rows. The one-execution stream is a
measurement, not a project stream: its plan is a row of (epoch, part) ids, and each decode task
takes its part of that epoch's permutation from the encoded split, put in the object store once.
Batches are consumed as in bench_data.py (uint8 normalised to float32 in the consumer). The two
run one after the other (not alternating: the second is a single execution), so run it on a quiet
machine.

    .venv/bin/python benchmarks/bench_stream_epochs.py --epochs 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without `pip install -e .`


def decode_parts(batch: dict, table_ref: list, rows: int, n: int, order_seed: int, size: int, batch_size: int, uint8: bool) -> Iterator[dict]:
    """(epoch · parts + part) ids → that part of the epoch's permutation, decoded batch by batch."""
    import ray

    from pipelines.data.transforms import augment_batch

    table = ray.get(table_ref[0])  # zero-copy from the object store
    parts = -(-n // rows)
    for part_id in batch["id"]:
        epoch, part = divmod(int(part_id), parts)
        positions = np.random.default_rng([order_seed, epoch]).permutation(n)[part * rows:(part + 1) * rows]
        chunk = table.take(positions)
        images = np.array(chunk.column("image").to_pylist(), dtype=object)
        labels, index = chunk.column("label").to_numpy(), chunk.column("index").to_numpy()
        for s in range(0, len(positions), batch_size):
            yield augment_batch({"image": images[s:s + batch_size], "label": labels[s:s + batch_size], "index": index[s:s + batch_size]},
                                size=size, seed=0, repeatable=False, uint8=uint8)


def epoch_rates(sizes: Iterator[int], n: int, epochs: int) -> list[float]:
    """img/s of each epoch's worth of rows (n rows), from the sizes of the batches as they are consumed."""
    marks, seen, start = [], 0, time.perf_counter()
    for size in sizes:
        seen += size
        while len(marks) < epochs and seen >= n * (len(marks) + 1):
            marks.append(time.perf_counter())
    bounds = [start, *marks]
    return [n / (b - a) for a, b in zip(bounds, bounds[1:])]


def main() -> None:
    from bench_data import PREFETCH_PER_WORKER, add_stream_arguments, consume, ray_pass  # this script's folder is on sys.path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stream_arguments(ap, epochs=4)
    ap.add_argument("--format", choices=["float32", "uint8"], default="uint8")
    args = ap.parse_args()

    import ray
    import torch

    from pipelines.data.streams import rows_per_task
    from pipelines.data.dataset import IngestedDataset
    from pipelines.data.ingest import IngestOptions, ingest

    data_dir = args.work / args.src.name
    ingest(args.src, data_dir, IngestOptions(), progress=False, log=lambda _: None)
    table = pa.concat_tables([pq.read_table(f, columns=["image", "label", "index"]) for f in IngestedDataset.load(data_dir).shard_files("train")]).combine_chunks()
    n, uint8 = table.num_rows, args.format == "uint8"
    rows = rows_per_task(args.batch, n)
    print(f"train split of {args.src}: {n} images, S={args.size}, batch {args.batch}, {args.workers} decode tasks at a time, "
          f"{rows} rows per task, {args.format}")

    torch.set_num_threads(1)
    try:
        per_epoch = ray_pass(data_dir, args.size, args.workers, args.batch, uint8)  # the project's stream, as bench_data.py runs it
        separate = [epoch_rates(per_epoch(), n, 1)[0] for _ in range(args.epochs)]
        parts = -(-n // rows)
        one_run = ray.data.range(args.epochs * parts, override_num_blocks=args.epochs * parts).map_batches(
            decode_parts, batch_size=1, concurrency=args.workers,
            fn_kwargs={"table_ref": [ray.put(table)], "rows": rows, "n": n, "order_seed": int.from_bytes(os.urandom(4), "little"),
                       "size": args.size, "batch_size": args.batch, "uint8": uint8},
        )
        batches = one_run.iter_torch_batches(batch_size=args.batch, prefetch_batches=args.workers * PREFETCH_PER_WORKER)
        together = epoch_rates((consume(b, uint8) for b in batches), n, args.epochs)
    finally:
        ray.shutdown()

    print("\n| epoch | one execution per epoch (img/s) | one execution for all epochs (img/s) | ratio |")
    print("|---:|---:|---:|---:|")
    for e, (a, b) in enumerate(zip(separate, together, strict=True), start=1):
        print(f"| {e} | {a:.0f} | {b:.0f} | {b / a:.2f}× |")
    if args.epochs > 1:
        # rows over time (not the mean of the rates): in one execution an epoch's rows can arrive
        # early, prefetched during the one before, which makes single epochs look fast
        a, b = (len(r[1:]) / sum(1 / x for x in r[1:]) for r in (separate, together))
        print(f"| 2–{args.epochs} | {a:.0f} | {b:.0f} | **{b / a:.2f}×** |")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
