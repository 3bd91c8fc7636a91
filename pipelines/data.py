"""Ray Data streams over an ingested folder: augmented training, evaluation, un-augmented training.

Every builder returns a lazy `ray.data.Dataset`; pass it to `TorchTrainer(datasets=...)` and
read it in the workers with `ray.train.get_dataset_shard(name).iter_torch_batches(...)`.
Decode and augmentation run in `map_batches` on CPU workers (`pipelines.transforms`: PIL and
numpy, no torch), never on the trainer's GPU.

Per sample the training stream emits
    image     float32 [3, S, S]  ImageNet-normalised (timm's IMAGENET_DEFAULT_MEAN/STD)
    label     int64
    index     int64              the dataset's dense, stable index (train rows are 0..n_train-1)
    crop_box  float32 [4]        (x0, y0, x1, y1) of the crop in the SOURCE image, each in [0, 1]
    flipped   bool               the crop was flipped horizontally after cropping
so the trainer can move each image's attention map through the same geometry. The eval
stream emits image, label and index only, the image resized whole to S×S (no crop: an
attention map computed on it covers the whole image).
"""

from __future__ import annotations

from pathlib import Path

import ray

from pipelines.dataset import IngestedDataset
from pipelines.transforms import augment_batch, resize_batch

_READ_COLUMNS = ["image", "label", "index"]


def train_stream(
    data_dir: str | Path, split: str = "train", size: int = 224, seed: int = 0, *,
    repeatable: bool = False, shuffle: bool = True, batch_size: int = 32, concurrency: int | None = None,
) -> ray.data.Dataset:
    """Shuffled, decoded, RandomResizedCrop(size, scale 0.2–1, ratio 3/4–4/3, bicubic) + flip(0.5) samples.

    Shards are written class by class, so without `shuffle` every batch would hold one class
    and a classifier would only ever learn the class it saw last. The encoded rows are
    shuffled (before decoding, so the shuffle moves bytes, not tensors), afresh on each pass;
    with `repeatable=True` the order is seeded too.

    Ray Data re-runs the map on every pass over the dataset and tells it nothing about the
    epoch, so a seed alone cannot give crops that differ per epoch *and* are reproducible.
    Default (`repeatable=False`): each pass draws fresh crops (OS entropy mixed with `seed`),
    which is what training wants. `repeatable=True`: every sample's crop depends only on
    (seed, index), identical on every pass — for tests and debugging. Either way the crop
    actually used is emitted, so nothing downstream relies on replaying the randomness.
    """
    ds = _read(data_dir, split)
    if shuffle:
        ds = ds.random_shuffle(seed=seed if repeatable else None)
    return ds.map_batches(
        augment_batch,
        fn_kwargs={"size": size, "seed": seed, "repeatable": repeatable},
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        concurrency=concurrency,
    )


def eval_stream(
    data_dir: str | Path, split: str = "val", size: int = 224, seed: int | None = None, *,
    batch_size: int = 32, concurrency: int | None = None,
) -> ray.data.Dataset:
    """The whole image resized to size×size (bicubic), normalised. Deterministic.

    `seed` is accepted so every builder has the same signature; nothing here is random.
    """
    del seed
    ds = _read(data_dir, split)
    return ds.map_batches(
        resize_batch, fn_kwargs={"size": size}, batch_size=batch_size, batch_format="numpy",
        zero_copy_batch=True, concurrency=concurrency,
    )


def unaugmented_train_stream(
    data_dir: str | Path, split: str = "train", size: int = 224, seed: int | None = None, *,
    batch_size: int = 32, concurrency: int | None = None,
) -> ray.data.Dataset:
    """The training split through the eval transform: what attention maps are refreshed from."""
    return eval_stream(data_dir, split, size, seed, batch_size=batch_size, concurrency=concurrency)


def _read(data_dir: str | Path, split: str) -> ray.data.Dataset:
    files = IngestedDataset.load(data_dir).shard_files(split)
    if not files:
        raise ValueError(f"split {split!r} of {data_dir} is empty; re-run ingest with a larger --val/--test")
    # Ray 2.60's default Parquet reader (DataSourceV2) reads file footers in nested remote
    # tasks on every pass; on a small node that costs 5-10 s per epoch (measured: 420 images,
    # 0.9 s per pass with the V1 reader, 7-11 s with V2). The flag is read only while the plan
    # is built, so it is set for this one call and restored; the Dataset keeps the V1 reader.
    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet([str(f) for f in files])
    finally:
        ctx.use_datasource_v2 = previous
    return ds.select_columns(_READ_COLUMNS)
