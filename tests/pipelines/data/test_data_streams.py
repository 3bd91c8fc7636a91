"""Ray Data streams: shapes, labels, indices, and crop boxes that really describe the crop."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode

from pipelines.data.dataset import IngestedDataset

S = 32


def _collect(ds, batch_size: int = 64) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        for k, v in batch.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def _reference(img_bytes: bytes) -> Image.Image:
    return Image.open(io.BytesIO(img_bytes)).convert("RGB")


def _to_tensor_normalised(img: Image.Image) -> torch.Tensor:
    t = TF.to_tensor(img)  # [3, S, S] in [0, 1]
    return TF.normalize(t, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))


@pytest.fixture(scope="module")
def data_train_pass(ray_local, data_sample_ingested: Path) -> dict[str, torch.Tensor]:
    from pipelines.data.streams import train_stream

    return _collect(train_stream(IngestedDataset.load(data_sample_ingested), "train", S, seed=7, repeatable=True))


@pytest.fixture(scope="module")
def data_source_rows(data_sample_ingested: Path) -> dict[int, dict]:
    return {r["index"]: r for split in ("train", "val", "test") for r in IngestedDataset.load(data_sample_ingested).rows(split)}


def test_train_stream_yields_contract_shapes_and_every_train_index_once(data_train_pass, data_sample_ingested, data_source_rows):
    b = data_train_pass
    n_train = json.loads((data_sample_ingested / "dataset.json").read_text())["counts"]["train"]["total"]
    assert b["image"].shape == (n_train, 3, S, S) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.int64 and b["index"].dtype == torch.int64
    assert b["crop_box"].shape == (n_train, 4) and b["crop_box"].dtype == torch.float32
    assert b["flipped"].dtype == torch.bool
    assert sorted(b["index"].tolist()) == list(range(n_train))  # dense: train is 0..n_train-1
    for i, label in zip(b["index"].tolist(), b["label"].tolist()):
        assert data_source_rows[i]["label"] == label and data_source_rows[i]["split"] == "train"
    assert 0.3 < b["flipped"].float().mean() < 0.7


def test_crop_boxes_follow_random_resized_crop_limits(data_train_pass) -> None:
    box = data_train_pass["crop_box"]
    x0, y0, x1, y1 = box.unbind(1)
    assert (box >= 0).all() and (box <= 1).all() and (x1 > x0).all() and (y1 > y0).all()
    area = (x1 - x0) * (y1 - y0)  # the sample is square, so normalised area = pixel area fraction
    assert area.min() >= 0.2 - 0.03 and area.max() <= 1.0
    aspect = (x1 - x0) / (y1 - y0)
    assert aspect.min() >= 0.75 - 0.05 and aspect.max() <= 4 / 3 + 0.05
    assert area.std() > 0.1  # really random, not a fixed crop


def test_applying_emitted_box_and_flip_to_source_reproduces_the_streamed_image(data_train_pass, data_source_rows) -> None:
    b = data_train_pass
    for k in range(0, len(b["index"]), 37):
        row = data_source_rows[int(b["index"][k])]
        src = _reference(row["image"])
        x0, y0, x1, y1 = b["crop_box"][k].tolist()
        left, top = round(x0 * src.width), round(y0 * src.height)
        w, h = round(x1 * src.width) - left, round(y1 * src.height) - top
        crop = TF.resized_crop(src, top, left, h, w, [S, S], interpolation=InterpolationMode.BICUBIC)
        if b["flipped"][k]:
            crop = TF.hflip(crop)
        torch.testing.assert_close(b["image"][k], _to_tensor_normalised(crop), atol=1e-5, rtol=0)


def test_repeatable_stream_repeats_and_default_stream_varies(ray_local, data_sample_ingested, data_train_pass) -> None:
    from pipelines.data.streams import train_stream

    again = _collect(train_stream(IngestedDataset.load(data_sample_ingested), "train", S, seed=7, repeatable=True))
    order_a, order_b = data_train_pass["index"].argsort(), again["index"].argsort()
    assert torch.equal(data_train_pass["crop_box"][order_a], again["crop_box"][order_b])
    ds = train_stream(IngestedDataset.load(data_sample_ingested), "train", S, seed=7)  # fresh crops on each pass
    p1, p2 = _collect(ds), _collect(ds)
    assert not torch.equal(p1["crop_box"][p1["index"].argsort()], p2["crop_box"][p2["index"].argsort()])


@pytest.mark.parametrize("split", ["val", "train"])
def test_eval_stream_is_the_whole_image_resized(ray_local, data_sample_ingested, data_source_rows, split) -> None:
    from pipelines.data.streams import eval_stream, unaugmented_train_stream

    ds = unaugmented_train_stream(IngestedDataset.load(data_sample_ingested), size=S) if split == "train" else eval_stream(IngestedDataset.load(data_sample_ingested), split, S)
    b = _collect(ds)
    assert set(b) == {"image", "label", "index"}
    expected = sorted(i for i, r in data_source_rows.items() if r["split"] == split)
    assert sorted(b["index"].tolist()) == expected and b["image"].shape[1:] == (3, S, S)
    for k in range(0, len(b["index"]), 29):
        row = data_source_rows[int(b["index"][k])]
        assert int(b["label"][k]) == row["label"]
        ref = TF.resize(_reference(row["image"]), [S, S], interpolation=InterpolationMode.BICUBIC)
        torch.testing.assert_close(b["image"][k], _to_tensor_normalised(ref), atol=1e-5, rtol=0)


def test_train_stream_shards_across_two_workers_without_overlap(ray_local, data_sample_ingested) -> None:
    from pipelines.data.streams import train_stream

    shards = train_stream(IngestedDataset.load(data_sample_ingested), "train", S, seed=1).streaming_split(2, equal=True)
    seen: list[list[int]] = [[], []]

    def consume(rank: int) -> None:  # what each Ray Train worker does with its shard
        for batch in shards[rank].iter_torch_batches(batch_size=32):
            seen[rank].extend(batch["index"].tolist())

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_missing_split_and_folder_give_clear_errors(ray_local, data_sample_ingested, tmp_path) -> None:
    from pipelines.data.streams import eval_stream

    with pytest.raises(ValueError, match="has no 'holdout' split"):
        eval_stream(IngestedDataset.load(data_sample_ingested), "holdout", S)
    with pytest.raises(FileNotFoundError, match="msmae ingest"):
        eval_stream(IngestedDataset.load(tmp_path), "val", S)


def test_training_batches_mix_classes_although_shards_are_written_class_by_class(data_train_pass, ray_local, data_sample_ingested) -> None:
    # The sample's shards hold the classes one after another; unshuffled, a batch of 32 would
    # hold a single class and fine-tuning would never learn (seen on full BTMD before the fix).
    first_batch = data_train_pass["label"][:32]
    assert len(set(first_batch.tolist())) >= 3
    from pipelines.data.streams import train_stream

    ds = train_stream(IngestedDataset.load(data_sample_ingested), "train", S, seed=7)  # default: a new order on each pass
    order_a = [int(i) for b in ds.iter_batches(batch_size=64) for i in b["index"]]
    order_b = [int(i) for b in ds.iter_batches(batch_size=64) for i in b["index"]]
    assert sorted(order_a) == sorted(order_b) and order_a != order_b
