"""Issue 18's stream levers: uint8 images normalised by the consumer, the one-task shuffle of small splits, decode tasks of whole batches."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipelines.data.streams import normalise_images
from pipelines.data.transforms import augment_batch, permute_rows


def _encoded_batch(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for k in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + k, 56, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    return {"image": np.array(images, dtype=object), "label": np.arange(n) % 2, "index": np.arange(n)}


def test_uint8_images_normalised_by_the_consumer_equal_the_float_stream_exactly():
    batch = _encoded_batch()
    floats = augment_batch(batch, size=32, seed=3, repeatable=True)
    raw = augment_batch(batch, size=32, seed=3, repeatable=True, uint8=True)
    assert raw["image"].dtype == np.uint8 and raw["image"].shape == floats["image"].shape
    assert np.array_equal(normalise_images(torch.from_numpy(raw["image"])).numpy(), floats["image"])  # bit for bit
    assert np.array_equal(raw["crop_box"], floats["crop_box"]) and np.array_equal(raw["flipped"], floats["flipped"])


def test_permute_rows_is_a_permutation_seeded_or_fresh():
    table = pa.table({"index": np.arange(100)})
    seeded = permute_rows(table, 5).column("index").to_numpy()
    assert sorted(seeded) == list(range(100)) and not np.array_equal(seeded, np.arange(100))
    assert np.array_equal(seeded, permute_rows(table, 5).column("index").to_numpy())
    assert not np.array_equal(permute_rows(table, None).column("index").to_numpy(), permute_rows(table, None).column("index").to_numpy())


@pytest.mark.parametrize("one_task_below", [1 << 40, 0], ids=["one-task shuffle", "random_shuffle"])
def test_both_shuffles_give_every_train_index_once_in_mixed_batches(ray_local, data_sample_ingested, monkeypatch, one_task_below):
    import pipelines.data.streams as data
    from pipelines.data.dataset import IngestedDataset

    monkeypatch.setattr(data, "SHUFFLE_IN_ONE_TASK_BYTES", one_task_below)
    n_train = IngestedDataset.load(data_sample_ingested).split_size("train")
    batches = list(data.train_stream(IngestedDataset.load(data_sample_ingested), "train", 16, batch_size=32, uint8=True).iter_torch_batches(batch_size=32))
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(n_train))
    assert batches[0]["image"].dtype == torch.uint8
    assert all(len(set(b["label"].tolist())) > 1 for b in batches[:-1])  # shards are class by class; batches are not


@pytest.mark.parametrize(
    ("batch_size", "num_rows", "rows"),
    [(64, 4567, 512), (100, 100_000, 600), (512, 100_000, 512), (1024, 100_000, 1024), (1, 100_000, 512),
     (32, 480, 32), (64, 2048, 256), (64, 100, 64)],
)
def test_decode_tasks_take_whole_batches_of_task_rows_and_a_pass_keeps_enough_tasks(batch_size, num_rows, rows):
    from pipelines.data.streams import MIN_TASKS_PER_PASS, TASK_ROWS, rows_per_task

    assert rows_per_task(batch_size, num_rows) == rows
    assert rows % batch_size == 0
    assert rows >= TASK_ROWS or rows == batch_size or num_rows // rows >= MIN_TASKS_PER_PASS
