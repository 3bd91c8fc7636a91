"""Ray Data streams over an ingested dataset (``IngestedDataset``, read once by the caller): augmented training, evaluation, un-augmented training.

Every builder returns a lazy `ray.data.Dataset`; pass it to `TorchTrainer(datasets=...)` and
read it in the workers with `ray.train.get_dataset_shard(name).iter_torch_batches(...)`.
Decode and augmentation run in `map_batches` on CPU workers (`pipelines.data.transforms`: PIL and
numpy, no torch), never on the trainer's GPU.

Per sample the training stream emits
    image     float32 [3, S, S]  ImageNet-normalised (timm's IMAGENET_DEFAULT_MEAN/STD)
    label     int64
    index     int64              the dataset's dense, stable index (train rows are 0..n_train-1)
    crop_box  float32 [4]        (x0, y0, x1, y1) of the crop in the SOURCE image, each in [0, 1]
    flipped   bool               the crop was flipped horizontally after cropping
so the trainer can move each image's attention map through the same geometry. A dataset
ingested with lesion masks (``msmae ingest --masks``) adds
    mask      uint8 [S, S]       1 = lesion, the image's crop, flip and resize applied (nearest)
    has_mask  bool               the image has a mask (else ``mask`` is all zeros)
to every stream. The eval
stream emits image, label and index only, the image resized whole to S×S (no crop: an
attention map computed on it covers the whole image).
"""

from __future__ import annotations

import functools
import ray

from pipelines.data.dataset import IngestedDataset
from pipelines.data.transforms import augment_batch, permute_rows, resize_batch

_READ_COLUMNS = ["image", "label", "index"]


def train_stream(
    dataset: IngestedDataset, split: str = "train", size: int = 224, seed: int = 0, *,
    repeatable: bool = False, shuffle: bool = True, batch_size: int = 32, concurrency: int | None = None, uint8: bool = False,
) -> ray.data.Dataset:
    """Shuffled, decoded, RandomResizedCrop(size, scale 0.2–1, ratio 3/4–4/3, bicubic) + flip(0.5) samples.

    ``uint8``: ``image`` stays uint8 [3, S, S], normalised by the consumer (``normalise_images``,
    on its device): a quarter of the bytes through the object store and to the GPU.

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
    ds = _read(dataset, split)
    if shuffle:
        nbytes = sum(f.stat().st_size for f in dataset.shard_files(split))
        ds = _shuffled(ds, nbytes, seed if repeatable else None, rows_per_task(batch_size, dataset.split_size(split)))
    return ds.map_batches(
        augment_batch,
        fn_kwargs={"size": size, "seed": seed, "repeatable": repeatable, "uint8": uint8},
        batch_size=batch_size,
        batch_format="numpy",
        zero_copy_batch=True,
        concurrency=concurrency,
    )


def eval_stream(
    dataset: IngestedDataset, split: str = "val", size: int = 224, seed: int | None = None, *,
    batch_size: int = 32, concurrency: int | None = None,
) -> ray.data.Dataset:
    """The whole image resized to size×size (bicubic), normalised. Deterministic.

    `seed` is accepted so every builder has the same signature; nothing here is random.
    """
    del seed
    ds = _read(dataset, split)
    return ds.map_batches(
        resize_batch, fn_kwargs={"size": size}, batch_size=batch_size, batch_format="numpy",
        zero_copy_batch=True, concurrency=concurrency,
    )


def unaugmented_train_stream(
    dataset: IngestedDataset, split: str = "train", size: int = 224, seed: int | None = None, *,
    batch_size: int = 32, concurrency: int | None = None,
) -> ray.data.Dataset:
    """The training split through the eval transform: what attention maps are refreshed from."""
    return eval_stream(dataset, split, size, seed, batch_size=batch_size, concurrency=concurrency)


# Rows each decode task takes: whole batches, at least this many. Ray Data's executor notices a
# finished task only when it polls (every 0.1 s), so one-batch tasks (64 images, ~0.1 s) left each
# task slot idle for up to half the time: measured 1.1 tasks busy of 2 allowed. With 512-row
# tasks (~0.75 s on one core) the slots stay busy (bench_data.py, docs/data.md).
TASK_ROWS = 512
# ...but a pass keeps at least this many tasks, or a small split would be decoded by one task
# while the others wait, and its first batch would come only when the whole pass is decoded
# (the demo's 480 training images: data wait 16-19 % of pre-training in one task, 12-16 % in 15).
MIN_TASKS_PER_PASS = 8


def rows_per_task(batch_size: int, num_rows: int) -> int:
    """Whole batches: the fewest holding ``TASK_ROWS`` rows, fewer if the pass would then have
    under ``MIN_TASKS_PER_PASS`` tasks, at least one."""
    batches = min(-(-TASK_ROWS // batch_size), num_rows // (MIN_TASKS_PER_PASS * batch_size))
    return batch_size * max(1, batches)


# Below this many encoded bytes a split is shuffled by one task (all rows in one block, permuted,
# then cut back into blocks of rows_per_task rows): 0.4 s per pass for BTMD's 4,567 training rows (~130 MB)
# where Ray's distributed random_shuffle took 1-2 s, a barrier every pass before decoding starts.
# Larger splits use random_shuffle, which spreads the rows over the cluster's memory.
SHUFFLE_IN_ONE_TASK_BYTES = 512 << 20


def _shuffled(ds: ray.data.Dataset, nbytes: int, seed: int | None, rows_per_block: int) -> ray.data.Dataset:
    """The rows in a random order, afresh on every pass (seeded: the same order every pass)."""
    if nbytes > SHUFFLE_IN_ONE_TASK_BYTES:
        return ds.random_shuffle(seed=seed)
    ds = ds.repartition(1).map_batches(permute_rows, fn_kwargs={"seed": seed}, batch_size=None, batch_format="pyarrow")
    # back to smaller blocks, streaming (no shuffle): the decode map runs one task per block, in parallel
    return ds.repartition(target_num_rows_per_block=rows_per_block)


def _read(dataset: IngestedDataset, split: str) -> ray.data.Dataset:
    files = dataset.shard_files(split)
    if not files:
        raise ValueError(f"split {split!r} of {dataset.path} is empty; re-run ingest with a larger --val/--test")
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
    # a dataset ingested with lesion masks carries them through the same crop, flip and resize as its images
    return ds.select_columns(_READ_COLUMNS + (["mask"] if dataset.has_masks else []))


def normalise_images(images):
    """uint8 ``[B, 3, S, S]`` (a ``uint8`` stream's ``image``) → float32, ImageNet mean/std, on the images' device:
    the same arithmetic as ``transforms.normalise`` (x · 1/(255·std) − mean/std), float32 throughout."""
    import torch

    scale, shift = _normalisation_constants(images.device)
    return images.to(torch.float32).mul_(scale).add_(shift)


@functools.cache
def _normalisation_constants(device):
    """``transforms``' scale and shift on ``device``, copied there once rather than with every batch."""
    import torch

    from pipelines.data.transforms import _SCALE, _SHIFT

    return torch.from_numpy(_SCALE).to(device), torch.from_numpy(_SHIFT).to(device)


def with_float_images(batch: dict) -> dict:
    """A training batch as the step takes it: uint8 ``image`` normalised to float32 on its device (float32 passes as is)."""
    import torch

    return {**batch, "image": normalise_images(batch["image"])} if batch["image"].dtype == torch.uint8 else batch
