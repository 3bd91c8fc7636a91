"""Ray Data streams over an ingested folder: augmented training, evaluation, un-augmented training.

Every builder returns a lazy `ray.data.Dataset`; pass it to `TorchTrainer(datasets=...)` and
read it in the workers with `ray.train.get_dataset_shard(name).iter_torch_batches(...)`.
Decode and augmentation run in `map_batches` on CPU workers (PIL + torchvision), never on
the trainer's GPU.

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

import io
import json
import secrets
from pathlib import Path

import numpy as np
import ray
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from pipelines.ingest import shard_files

CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
INTERPOLATION = InterpolationMode.BICUBIC
# (x / 255 - mean) / std  ==  x * _SCALE + _SHIFT, done in two passes over the pixels
_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_DEFAULT_STD, dtype=np.float64))).astype(np.float32).reshape(3, 1, 1)
_SHIFT = (-np.asarray(IMAGENET_DEFAULT_MEAN) / np.asarray(IMAGENET_DEFAULT_STD)).astype(np.float32).reshape(3, 1, 1)
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


def num_classes(data_dir: str | Path) -> int:
    """Number of classes recorded by ingest (for building the model head)."""
    return len(json.loads((Path(data_dir) / "dataset.json").read_text())["classes"])


def _read(data_dir: str | Path, split: str) -> ray.data.Dataset:
    files = shard_files(Path(data_dir), split)
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


# --- per-batch transforms (run inside Ray Data workers; plain functions of numpy batches) ---


def decode(data: bytes) -> Image.Image:
    """Stored bytes → RGB PIL image (grayscale datasets are replicated to 3 channels)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def normalise(img: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
    """PIL RGB → float32 [3, H, W], ImageNet mean/std; written into `out` when given."""
    chw = np.asarray(img).transpose(2, 0, 1)  # uint8 [3, H, W], a view
    out = np.multiply(chw, _SCALE, out=out, dtype=np.float32)
    out += _SHIFT
    return out


def sample_crop(img: Image.Image) -> tuple[tuple[int, int, int, int], bool]:
    """torchvision's own RandomResizedCrop box (top, left, height, width) and a flip draw.

    Uses torch's global generator (as torchvision does); the caller seeds it.
    """
    top, left, h, w = RandomResizedCrop.get_params(img, list(CROP_SCALE), list(CROP_RATIO))
    flip = bool(torch.rand(1).item() < FLIP_P)
    return (top, left, h, w), flip


def apply_crop(img: Image.Image, box: tuple[int, int, int, int], flip: bool, size: int) -> Image.Image:
    """Crop (top, left, h, w), resize to size×size bicubic, then flip if asked."""
    out = TF.resized_crop(img, *box, [size, size], interpolation=INTERPOLATION)
    return TF.hflip(out) if flip else out


def augment_batch(batch: dict[str, np.ndarray], size: int, seed: int, repeatable: bool) -> dict[str, np.ndarray]:
    n = len(batch["index"])
    images = np.empty((n, 3, size, size), dtype=np.float32)  # [B, 3, S, S]
    boxes = np.empty((n, 4), dtype=np.float32)  # [B, 4] x0, y0, x1, y1 in [0, 1]
    flipped = np.empty(n, dtype=bool)
    nonce = 0 if repeatable else secrets.randbits(63)
    for k in range(n):
        index = int(batch["index"][k])
        # the CPU generator only: torch.manual_seed also queues a lazy CUDA seed with a stack trace
        torch.random.default_generator.manual_seed(int(np.random.SeedSequence([seed, index, nonce]).generate_state(1, np.uint64)[0] >> 1))
        img = decode(batch["image"][k])
        (top, left, h, w), flip = sample_crop(img)
        normalise(apply_crop(img, (top, left, h, w), flip, size), out=images[k])
        boxes[k] = (left / img.width, top / img.height, (left + w) / img.width, (top + h) / img.height)
        flipped[k] = flip
    return {
        "image": images,
        "label": batch["label"].astype(np.int64),
        "index": batch["index"].astype(np.int64),
        "crop_box": boxes,
        "flipped": flipped,
    }


def resize_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    n = len(batch["index"])
    images = np.empty((n, 3, size, size), dtype=np.float32)  # [B, 3, S, S]
    for k in range(n):
        img = decode(batch["image"][k])
        normalise(TF.resize(img, [size, size], interpolation=INTERPOLATION), out=images[k])
    return {"image": images, "label": batch["label"].astype(np.int64), "index": batch["index"].astype(np.int64)}
