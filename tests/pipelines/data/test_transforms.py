"""The torch-free per-batch transforms against torchvision and timm, which they stand in for."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, RandomResizedCrop

from pipelines.data import transforms
from pipelines.data.transforms import CROP_RATIO, CROP_SCALE, apply_crop, augment_batch, resize_whole, sample_crop

REPO = Path(__file__).resolve().parents[3]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_the_data_path_imports_no_torch():
    """Every Ray Data process imports it: torch + torchvision + timm would cost ~7 s of CPU each."""
    code = "import sys, pipelines.data.streams, pipelines.data.transforms; print(sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_normalisation_constants_are_timms():
    assert transforms.IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and transforms.IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)


@pytest.mark.parametrize("width,height", [(300, 300), (400, 300), (180, 300)])
def test_crop_boxes_have_torchvisions_limits_and_distribution(width, height):
    rng = np.random.default_rng(0)
    boxes = np.array([sample_crop(width, height, rng) for _ in range(3000)], dtype=np.float64)  # top, left, h, w
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (width * height)
    assert area.min() >= CROP_SCALE[0] - 0.02 and area.max() <= CROP_SCALE[1]
    assert (w / h).min() >= CROP_RATIO[0] - 0.02 and (w / h).max() <= CROP_RATIO[1] + 0.02
    torch.manual_seed(0)
    reference = torch.empty(1, height, width)
    tv = np.array([RandomResizedCrop.get_params(reference, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(3000)], dtype=np.float64)
    assert abs(area.mean() - (tv[:, 2] * tv[:, 3] / (width * height)).mean()) < 0.02
    assert abs(w.mean() - tv[:, 3].mean()) / width < 0.02 and abs(top.mean() - tv[:, 0].mean()) / height < 0.02


@pytest.mark.parametrize("width,height", [(1000, 10), (10, 1000)])
def test_extreme_aspects_fall_back_to_torchvisions_centred_crop(width, height):
    expected = RandomResizedCrop.get_params(torch.empty(1, height, width), list(CROP_SCALE), list(CROP_RATIO))
    assert sample_crop(width, height, np.random.default_rng(0)) == tuple(expected)


@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_and_flip_give_torchvisions_pixels(flip):
    img, box, size = _image(97, 61), (5, 11, 40, 53), 32
    expected = TF.resized_crop(img, *box, [size, size], interpolation=InterpolationMode.BICUBIC)
    expected = TF.hflip(expected) if flip else expected
    assert np.array_equal(np.asarray(apply_crop(img, box, flip, size)), np.asarray(expected))
    whole = TF.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC)
    assert np.array_equal(np.asarray(resize_whole(img, size)), np.asarray(whole))


def test_repeatable_crops_depend_on_seed_and_index_only():
    encoded = []
    for seed in range(4):
        buffer = io.BytesIO()
        _image(64, 48, seed).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    batch = {"image": np.array(encoded, dtype=object), "label": np.arange(4), "index": np.arange(10, 14)}
    first = augment_batch(batch, size=16, seed=3, repeatable=True)
    again = augment_batch(batch, size=16, seed=3, repeatable=True)
    other_seed = augment_batch(batch, size=16, seed=4, repeatable=True)
    fresh = augment_batch(batch, size=16, seed=3, repeatable=False)
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["crop_box"], again["crop_box"])
    assert not np.array_equal(first["crop_box"], other_seed["crop_box"])
    assert not np.array_equal(first["crop_box"], fresh["crop_box"])
    assert first["image"].shape == (4, 3, 16, 16) and first["image"].dtype == np.float32


@pytest.mark.parametrize("mode,max_side", [("RGB", None), ("L", None), ("RGB", 40)])
def test_predict_decodes_with_the_models_preprocessing(tmp_path, mode, max_side):
    """msmae predict's decode tasks give the served model's pixels (Preprocessing on a path) for the
    dataset's channel mode and --max-side too, not a fixed RGB decode."""
    from pipelines.data.preprocessing import Preprocessing, load_for_predict

    path = tmp_path / "scan.png"
    _image(90, 70, seed=3).save(path)
    recipe = Preprocessing(img_size=32, mode=mode, max_side=max_side)
    batch = {"path": np.array([str(path)], dtype=object), "problem": np.array([None], dtype=object),
             "detail": np.array([None], dtype=object)}
    out = load_for_predict(batch, recipe.to_dict(), max_file_bytes=1 << 30)
    assert out["ok"].tolist() == [True]
    np.testing.assert_array_equal(transforms.normalise(Image.fromarray(out["pixels"][0])), recipe(str(path)))
    if mode == "L":  # grey training data: the three channels are equal, as training stored them
        assert np.array_equal(out["pixels"][0][..., 0], out["pixels"][0][..., 2])
