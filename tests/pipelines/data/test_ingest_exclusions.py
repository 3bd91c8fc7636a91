"""Ingest leaves out what is not an image of its class: masks saved beside their images, and --exclude globs;
it counts what it left out, prints images per class and split, and warns of class imbalance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipelines.data.dataset import IngestedDataset
from pipelines.data.mask_files import find_mask_files, image_stem_of
from cli_harness import Q, assert_clean, invoke


def test_mask_names_are_recognised_only_beside_their_image():
    paths = [
        "benign/benign (1).png", "benign/benign (1)_mask.png", "benign/benign (1)_mask_1.png",  # BUSI, two lesions
        "isic/ISIC_0000000.jpg", "isic/ISIC_0000000_segmentation.png",  # ISIC
        "a/scan-SEG.tif", "a/scan.tif",  # another separator and case
        "a/lone_mask.png",  # no image "lone" beside it: an image like any other
        "b/benign (1)_mask.png",  # its image is in another folder
        "a/masked.png", "a/mask.png",  # a word, not a suffix
    ]
    assert find_mask_files(paths) == {
        "benign/benign (1)_mask.png": "benign/benign (1).png",
        "benign/benign (1)_mask_1.png": "benign/benign (1).png",
        "isic/ISIC_0000000_segmentation.png": "isic/ISIC_0000000.jpg",
        "a/scan-SEG.tif": "a/scan.tif",
    }
    assert image_stem_of("x_seg_2.png") == "x" and image_stem_of("x.png") is None


def _binary_mask(image: Path) -> Image.Image:
    """A lesion mask the size of ``image``: a white ellipse on black, as BUSI ships them."""
    with Image.open(image) as im:
        w, h = im.size
    yy, xx = np.mgrid[:h, :w]
    inside = ((xx - w / 2) / (w / 4)) ** 2 + ((yy - h / 2) / (h / 4)) ** 2 <= 1
    return Image.fromarray((inside * 255).astype(np.uint8), "L")


@pytest.fixture
def data_tree_with_masks(tmp_path: Path, data_sample_btmd: Path) -> Path:
    """Four images of two classes from the bundled sample, each glioma with a `_mask.png` beside it."""
    root = tmp_path / "busi_like"
    for cls in ("glioma", "notumor"):
        (root / cls).mkdir(parents=True)
        for src in sorted((data_sample_btmd / cls).iterdir())[:4]:
            shutil.copy(src, root / cls / src.name)
            if cls == "glioma":
                _binary_mask(src).save(root / cls / f"{src.stem}_mask.png")
    return root


def _ingested_paths(out: Path) -> list[str]:
    dataset = IngestedDataset.load(out)
    return [str(r["source"]) for s in ("train", "val") for r in dataset.rows(s)]


def test_masks_beside_images_are_left_out_and_counted(data_tree_with_masks: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke(["ingest", "--data", data_tree_with_masks, "--out", out, "--val", "0.25", *Q])
    assert_clean(result, 0, ("left out 4 mask-like file(s)", "e.g. glioma/", "_mask.png", "--keep-mask-like",
                             "8 images kept", "4 left out (4 mask-like, 0 --exclude; excluded.csv)"))
    summary = json.loads((out / "dataset.json").read_text())
    assert summary["num_images"] == 8 and summary["excluded"]["mask_like"] == 4
    assert summary["excluded"]["mask_like_example"].endswith("_mask.png")
    excluded = pl.read_csv(out / "excluded.csv")
    assert excluded["reason"].to_list() == ["mask_like"] * 4
    assert all(p.endswith("_mask.png") for p in excluded["path"].to_list())
    assert summary["counts"]["train"]["glioma"] + summary["counts"]["val"]["glioma"] == 4  # the images, not their masks


def test_keep_mask_like_ingests_masks_as_images_and_warns(data_tree_with_masks: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = invoke(["ingest", "--data", data_tree_with_masks, "--out", out, "--val", "0.25", "--keep-mask-like", *Q])
    assert_clean(result, 0, ("12 images kept", "warning: 4 file(s) named like the mask of an image beside them"))
    assert json.loads((out / "dataset.json").read_text())["excluded"]["mask_like_kept"] == 4


def test_exclude_globs_leave_files_out_and_count_them(data_tree_with_masks: Path, tmp_path: Path):
    (data_tree_with_masks / "notumor" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    first_notumor = sorted(p.name for p in (data_tree_with_masks / "notumor").glob("*.jpg"))[0]
    result = invoke(["ingest", "--data", data_tree_with_masks, "--out", out, "--val", "0.25", "--exclude", "*.txt",
                     "--exclude", f"notumor/{first_notumor}", *Q])
    assert_clean(result, 0, ("left out 2 file(s) matching --exclude *.txt notumor/", "0 quarantined", "7 images kept"))
    excluded = pl.read_csv(out / "excluded.csv")
    assert sorted(excluded.filter(pl.col("reason") == "exclude_pattern")["path"].to_list()) == sorted(
        ["notumor/notes.txt", f"notumor/{first_notumor}"])
    assert not any(p.endswith(first_notumor) for p in _ingested_paths(out))


def test_per_class_counts_and_an_imbalance_warning(tmp_path: Path, data_sample_btmd: Path):
    root = tmp_path / "imbalanced"
    for cls, n in (("glioma", 9), ("notumor", 2)):
        (root / cls).mkdir(parents=True)
        for src in sorted((data_sample_btmd / cls).iterdir())[:n]:
            shutil.copy(src, root / cls / src.name)
    result = invoke(["ingest", "--data", root, "--out", tmp_path / "out", "--val", "0.5", *Q])
    assert_clean(result, 0, ("warning: classes are imbalanced: 'glioma' has", "'notumor' 2", "class_weights=balanced"))
    table = [line.split() for line in result.output.splitlines() if line.startswith("  ")]
    assert table[0] == ["glioma", "notumor", "total"]
    rows = {r[0]: [int(v) for v in r[1:]] for r in table[1:]}
    assert set(rows) == {"train", "val"} and all(r[-1] == sum(r[:-1]) for r in rows.values())
    assert (rows["train"][0] + rows["val"][0], rows["train"][1] + rows["val"][1]) == (9, 2)


def test_a_manifest_naming_masks_and_excluded_files_has_them_left_out(data_tree_with_masks: Path, tmp_path: Path):
    """Manifest rows are matched by their file under --image-root, like ImageFolder paths under the root."""
    from pipelines.data.ingest import IngestOptions, ingest
    from pipelines.data.sources import ManifestSpec

    files = sorted(p.relative_to(data_tree_with_masks).as_posix() for p in data_tree_with_masks.rglob("*.*"))
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame({"image": files, "label": [f.split("/")[0] for f in files]}).write_csv(manifest)
    spec = ManifestSpec(manifest, data_tree_with_masks, "image", "label")
    excluded_image = next(f for f in files if f.startswith("notumor/"))
    opts = IngestOptions(val=0.25, exclude=(excluded_image,), workers=1)
    summary = ingest(spec, tmp_path / "out", opts, progress=False, log=lambda _: None).summary
    assert (summary["num_images"], summary["excluded"]["mask_like"], summary["excluded"]["by_pattern"]) == (7, 4, 1)
    assert summary["num_listed"] == len(files) - 5
