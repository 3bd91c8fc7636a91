"""Lesion masks as data: paired, checked and quarantined at ingest, stored in the shards, and carried
through exactly the crop, flip and resize of their image."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data import masks, transforms
from pipelines.data.dataset import IngestedDataset
from pipelines.data.ingest import IngestOptionError, IngestOptions, ingest
from pipelines.data.sources import ManifestSpec


def _lesion(width: int, height: int, seed: int) -> np.ndarray:
    """A bool lesion: an off-centre ellipse, different per seed."""
    rng = np.random.default_rng(seed)
    cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
    y, x = np.mgrid[:height, :width]
    return ((x - cx) / (0.25 * width)) ** 2 + ((y - cy) / (0.3 * height)) ** 2 <= 1


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def ham_like(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A manifest of 12 images 40x30 in two classes, their masks, and bad masks for four of them."""
    images, mask_dir = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    mask_dir.mkdir()
    rows = []
    for i in range(12):
        image_id = f"ISIC_{i:07d}"
        lesion = _lesion(40, 30, i)
        pixels = np.random.default_rng(i).integers(0, 120, (30, 40, 3), dtype=np.uint8)
        pixels[lesion] += 120  # the lesion is brighter: the image shows where its mask is
        Image.fromarray(pixels).save(images / f"{image_id}.png")
        mask = lesion.astype(np.uint8) * 255
        if i == 1:
            mask = np.asarray(Image.fromarray(mask).resize((41, 30)))  # wrong frame
        elif i == 2:
            continue  # no mask
        elif i == 3:
            mask[:] = 0  # marks nothing
        elif i == 4:
            mask = np.where(lesion, 200, 30).astype(np.uint8)  # grey: thresholded at half its range
        (mask_dir / f"{image_id}{masks.MASK_SUFFIX}").write_bytes(_png(mask)) if i != 5 else (mask_dir / f"{image_id}{masks.MASK_SUFFIX}").write_bytes(b"not a png")
        rows.append({"image_id": image_id, "dx": "nv" if i % 2 else "mel", "lesion_id": f"L{i}"})
    for i in range(2, 3):
        rows.append({"image_id": f"ISIC_{i:07d}", "dx": "mel", "lesion_id": f"L{i}"})
    (mask_dir / f"ISIC_9999999{masks.MASK_SUFFIX}").write_bytes(_png(np.full((30, 40), 255, np.uint8)))  # no such image
    manifest = tmp_path / "meta.csv"
    pl.DataFrame(rows).sort("image_id").write_csv(manifest)
    return manifest, images, mask_dir


def test_ingest_pairs_checks_quarantines_and_stores_masks(ham_like, tmp_path: Path) -> None:
    manifest, images, mask_dir = ham_like
    out = tmp_path / "ds"
    result = ingest(ManifestSpec(manifest, images, "image_id", "dx", "lesion_id"), out,
                    IngestOptions(val=0.25, masks=str(mask_dir), workers=1, near_dup=None), progress=False, log=lambda _: None)
    summary = result.summary["masks"]
    assert summary["paired"] == 8 and summary["thresholded"] == 1 and summary["unclaimed"] == 1
    assert summary["quarantine_reasons"] == {masks.EMPTY_MASK: 1, masks.MASK_SIZE: 1, masks.MISSING_MASK: 1, masks.UNREADABLE_MASK: 1}
    quarantined = pl.read_csv(out / masks.MASK_QUARANTINE_FILE)
    assert quarantined.height == 4 and quarantined["detail"].null_count() == 0
    assert result.summary["num_images"] == 12  # a bad mask costs its image nothing but the lesion score
    dataset = IngestedDataset.load(out)
    assert dataset.has_masks
    rows = {r["source"]: r for split in ("train", "val") for r in dataset.rows(split)}
    assert rows["ISIC_0000002"]["mask"] is None and rows["ISIC_0000001"]["mask"] is None
    for i in (0, 4, 6):
        stored = masks.decode_mask(rows[f"ISIC_{i:07d}"]["mask"], (40, 30))
        assert np.array_equal(stored, _lesion(40, 30, i))  # binary 0/255 and grey alike, pixel for pixel


def test_datasets_without_masks_keep_their_schema_and_mask_options_are_checked(ham_like, tmp_path: Path) -> None:
    manifest, images, mask_dir = ham_like
    spec = ManifestSpec(manifest, images, "image_id", "dx", "lesion_id")
    plain = ingest(spec, tmp_path / "plain", IngestOptions(val=0.25, workers=1, near_dup=None), progress=False, log=lambda _: None)
    assert "masks" not in plain.summary and not plain.dataset.has_masks
    assert "mask" not in pq.read_schema(plain.dataset.shard_files("train")[0]).names
    with pytest.raises(IngestOptionError, match="not a folder"):
        ingest(spec, tmp_path / "x", IngestOptions(masks=str(tmp_path / "nowhere"), workers=1), progress=False, log=lambda _: None)
    with pytest.raises(IngestOptionError, match="--mask-col names a manifest column"):
        ingest(images, tmp_path / "y", IngestOptions(mask_col="mask", workers=1), progress=False, log=lambda _: None)


def test_a_mask_column_names_each_images_mask(ham_like, tmp_path: Path) -> None:
    manifest, images, mask_dir = ham_like
    table = pl.read_csv(manifest).with_columns(seg=pl.col("image_id") + masks.MASK_SUFFIX)
    table.write_csv(with_col := tmp_path / "with_col.csv")
    result = ingest(ManifestSpec(with_col, images, "image_id", "dx", "lesion_id"), tmp_path / "ds",
                    IngestOptions(val=0.25, masks=str(mask_dir), mask_col="seg", workers=1, near_dup=None),
                    progress=False, log=lambda _: None)
    assert result.summary["masks"]["paired"] == 8 and result.summary["masks"]["column"] == "seg"


def _batch(n: int = 6, width: int = 40, height: int = 30) -> tuple[dict, list[np.ndarray]]:
    """Images whose pixels are their masks (0 / 255 in every channel), and the masks."""
    lesions = [_lesion(width, height, 100 + k) for k in range(n)]
    images = [_png(np.repeat((m.astype(np.uint8) * 255)[..., None], 3, axis=2)) for m in lesions]
    stored = [_png(m) for m in lesions]
    stored[-1] = None  # an image without a mask
    batch = {"image": np.array(images, dtype=object), "label": np.zeros(n, dtype=np.int64), "index": np.arange(n),
             "mask": np.array(stored, dtype=object)}
    return batch, lesions


def test_a_mask_survives_crop_and_flip_exactly_like_its_image() -> None:
    batch, lesions = _batch()
    size = 16
    out = transforms.augment_batch(batch, size=size, seed=7, repeatable=True, uint8=True)
    assert out["mask"].shape == (6, size, size) and out["has_mask"].tolist() == [True] * 5 + [False]
    assert not out["mask"][-1].any()
    flips = 0
    for k in range(5):
        x0, y0, x1, y1 = out["crop_box"][k].astype(np.float64)
        left, top = round(x0 * 40), round(y0 * 30)
        box = (top, left, round(y1 * 30) - top, round(x1 * 40) - left)
        # the image's own geometry (the box and flip the stream emitted), applied to the mask, nearest
        reference = Image.fromarray(lesions[k]).convert("L").crop((left, top, left + box[3], top + box[2]))
        reference = reference.resize((size, size), Image.Resampling.NEAREST)
        if out["flipped"][k]:
            reference = reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            flips += 1
        assert np.array_equal(out["mask"][k], np.asarray(reference) > 0)  # pixel-exact
        # and the mask lies where the image shows it: the bicubic image, thresholded, agrees but at edges
        shown = out["image"][k, 0] > 127
        assert (shown == out["mask"][k].astype(bool)).mean() > 0.9
        if out["flipped"][k]:  # an unflipped mask would disagree with its flipped image
            assert (shown == out["mask"][k][:, ::-1].astype(bool)).mean() < (shown == out["mask"][k].astype(bool)).mean()
    assert flips  # the seed gives at least one flip


def test_the_eval_transform_resizes_a_mask_with_its_image() -> None:
    batch, lesions = _batch()
    out = transforms.resize_batch(batch, size=16)
    expected = np.asarray(Image.fromarray(lesions[0]).convert("L").resize((16, 16), Image.Resampling.NEAREST)) > 0
    assert np.array_equal(out["mask"][0], expected) and out["has_mask"].sum() == 5
    plain = transforms.resize_batch({k: v for k, v in batch.items() if k != "mask"}, size=16)
    assert "mask" not in plain and np.array_equal(plain["image"], out["image"])


def test_streams_carry_masks_and_the_worker_scores_maps_against_them(ray_local, ham_like, tmp_path: Path) -> None:
    """Through Ray Data: the eval and training streams of a dataset with masks carry them; a refresh's lesion
    metrics (pipelines.train.worker.lesion_metrics) score maps on the validation images that have one."""
    import torch

    import msmae
    from pipelines.data.streams import eval_stream, train_stream
    from pipelines.train.worker import LESION_KEYS, lesion_metrics

    manifest, images, mask_dir = ham_like
    dataset = ingest(ManifestSpec(manifest, images, "image_id", "dx", "lesion_id"), tmp_path / "ds",
                     IngestOptions(val=0.5, masks=str(mask_dir), workers=1, near_dup=None), progress=False, log=lambda _: None).dataset
    train = next(iter(train_stream(dataset, size=16, batch_size=64, repeatable=True).iter_batches(batch_size=64)))
    assert train["mask"].shape == (dataset.split_size("train"), 16, 16) and train["has_mask"].any()
    val = eval_stream(dataset, "val", size=16, batch_size=4)
    with_masks = sum(int(b["has_mask"].sum()) for b in val.iter_batches(batch_size=4))
    model = msmae.build_pretrain_model(msmae.get_preset("tiny", img_size=16, patch_size=8), dataset.num_classes)
    scores = lesion_metrics(model, val, 4, "cpu", "cls_attention", msmae.MaskRatios(0.5, 0.0), torch.Generator().manual_seed(0))
    assert set(scores) == set(LESION_KEYS)
    assert scores["lesion_images"] + scores["lesion_images_skipped"] == with_masks > 0


def test_cli_ingests_masks_reports_them_and_an_edited_mask_rebuilds(ham_like, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from msmae_cli import app

    manifest, images, mask_dir = ham_like
    args = ["ingest", "--manifest", str(manifest), "--image-root", str(images), "--image-col", "image_id", "--label-col", "dx",
            "--masks", str(mask_dir), "--workers", "1", "--no-progress", "--no-near-dup", "--out", str(tmp_path / "o")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "lesion masks: 8 of 12 images paired (1 thresholded to binary), 4 quarantined" in first.output
    assert "nothing rewritten" in CliRunner().invoke(app, args).output
    mask = mask_dir / f"ISIC_0000000{masks.MASK_SUFFIX}"
    mask.write_bytes(_png(np.zeros((30, 40), np.uint8)))  # the lesion erased: the dataset must change
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing rewritten" not in again.output and "5 quarantined" in again.output
    bad = CliRunner().invoke(app, [*args[:-2], "--mask-col", "seg", "--out", str(tmp_path / "p")])
    assert bad.exit_code == 2 and "column 'seg' (--mask-col) not found" in bad.output
