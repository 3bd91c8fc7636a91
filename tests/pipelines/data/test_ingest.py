"""Ingest: every listed file is kept or quarantined with a reason, splits never leak groups."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipelines.data.dataset import IngestedDataset
from pipelines.data.ingest import IngestOptions, ingest
from pipelines.data.sources import ManifestSpec

QUIET = {"progress": False, "log": lambda _: None}


def data_png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_random_image(seed: int, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Image.Image:
    """A deterministic noisy image (distinct per seed, so no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def _all_rows(out: Path) -> list[dict]:
    summary = json.loads((out / "dataset.json").read_text())
    return [r for s in summary["fractions"] for r in IngestedDataset.load(out).rows(s)]


def _quarantine(out: Path) -> pl.DataFrame:
    return pl.read_csv(out / "quarantine.csv")


@pytest.fixture
def data_bad_tree(tmp_path: Path) -> Path:
    """An ImageFolder with every bad kind, odd names, all the modes, and duplicates."""
    root = tmp_path / "tree"
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir()
    good = [data_random_image(i) for i in range(12)]
    # odd names: spaces, brackets, unicode
    (cat / "a b [1] (copy) ü.jpg").write_bytes(data_png_bytes(good[0], "JPEG", quality=90))
    (cat / "日本語 & émoji 🙂.png").write_bytes(data_png_bytes(good[1]))
    # every mode ingest must convert
    arr16 = (np.arange(40 * 32, dtype=np.uint16).reshape(32, 40) * 50).astype(np.uint16)
    (cat / "sixteen_bit.png").write_bytes(data_png_bytes(Image.fromarray(arr16)))
    (cat / "rgba.png").write_bytes(data_png_bytes(good[2].convert("RGBA")))
    (cat / "cmyk.jpg").write_bytes(data_png_bytes(good[3].convert("CMYK"), "JPEG", quality=90))
    (cat / "palette.gif").write_bytes(data_png_bytes(good[4].convert("P"), "GIF"))
    (cat / "gray.jpg").write_bytes(data_png_bytes(good[5].convert("L"), "JPEG"))
    # bad kinds
    full = data_png_bytes(good[6], "JPEG", quality=95)
    (cat / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = bytearray(data_png_bytes(good[7]))
    png[len(png) // 2 : len(png) // 2 + 64] = bytes(64)  # damaged pixel data: opens, fails to decode
    (cat / "corrupt.png").write_bytes(bytes(png))
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "notes.txt").write_text("not an image")
    # identical image under two labels: a conflict, both copies quarantined
    conflict = data_png_bytes(good[8])
    (cat / "conflict.png").write_bytes(conflict)
    (dog / "conflict.png").write_bytes(conflict)
    # same-label duplicates: byte-identical, and pixel-identical in another format
    dup = data_png_bytes(good[9])
    (dog / "dup.png").write_bytes(dup)
    (dog / "dup copy (2).png").write_bytes(dup)
    good[9].save(dog / "dup as bmp.bmp")
    (dog / "plain.png").write_bytes(data_png_bytes(good[10]))
    (dog / "plain2.png").write_bytes(data_png_bytes(good[11]))
    (root / "stray.jpg").write_bytes(data_png_bytes(good[0], "JPEG"))  # no class folder
    return root


def test_bad_files_land_in_quarantine_with_their_reason(data_bad_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = ingest(data_bad_tree, out, IngestOptions(val=0.3, seed=1, workers=1), **QUIET)
    q = _quarantine(out)
    reasons = dict(Counter(q["reason"].to_list()))
    assert reasons == {
        "truncated": 1, "corrupt": 1, "zero_byte": 1, "not_an_image": 1,
        "duplicate_label_conflict": 2, "no_class_folder": 1,
    }
    by_name = {Path(p).name: r for p, r in zip(q["path"], q["reason"])}
    assert by_name["truncated.jpg"] == "truncated" and by_name["corrupt.png"] == "corrupt"
    assert by_name["empty.jpg"] == "zero_byte" and by_name["notes.txt"] == "not_an_image"
    s = res.summary
    listed = sum(1 for p in data_bad_tree.rglob("*") if p.is_file())
    assert s["num_listed"] == listed == s["num_images"] + s["quarantined"]  # nothing vanishes
    assert s["quarantined"] == q.height == sum(s["quarantine_reasons"].values())
    assert s["label_conflict_groups"] == 1
    assert s["duplicate_groups"] == 1 and s["duplicate_images"] == 3  # png, png copy, bmp
    rows = _all_rows(out)
    kept = {r["source"] for r in rows}
    assert {"cat/a b [1] (copy) ü.jpg", "cat/日本語 & émoji 🙂.png", "dog/dup copy (2).png", "dog/dup as bmp.bmp"} <= kept
    assert sorted(r["index"] for r in rows) == list(range(len(rows)))


def test_every_mode_is_converted_to_the_declared_mode(data_bad_tree: Path, tmp_path: Path) -> None:
    for mode in ("RGB", "L"):
        out = tmp_path / mode
        ingest(data_bad_tree, out, IngestOptions(mode=mode, workers=1), **QUIET)
        rows, reencoded = _all_rows(out), 0
        for r in rows:
            with Image.open(io.BytesIO(r["image"])) as img:
                assert img.convert(mode).size == (r["width"], r["height"])
                if Path(r["source"]).stem in ("sixteen_bit", "rgba", "cmyk", "palette"):
                    assert img.mode == mode, r["source"]  # re-encoded, already in the declared mode
                    reencoded += 1
        assert rows and reencoded == 4, (len(rows), reencoded)


def test_sixteen_bit_keeps_its_contrast(data_bad_tree: Path, tmp_path: Path) -> None:
    ingest(data_bad_tree, tmp_path / "o", IngestOptions(workers=1), **QUIET)
    row = next(r for r in _all_rows(tmp_path / "o") if r["source"] == "cat/sixteen_bit.png")
    px = np.asarray(Image.open(io.BytesIO(row["image"])))
    assert px.min() == 0 and px.max() == 255  # stretched, not clipped to white


def test_duplicates_stay_in_one_split(data_bad_tree: Path, tmp_path: Path) -> None:
    for seed in range(5):
        out = tmp_path / f"s{seed}"
        ingest(data_bad_tree, out, IngestOptions(val=0.5, seed=seed, workers=1), **QUIET)
        split_of_hash, copies = defaultdict(set), Counter()
        for r in _all_rows(out):
            split_of_hash[r["image_id"]].add(r["split"])
            copies[r["image_id"]] += 1
        assert max(copies.values()) >= 2  # the tree holds duplicates, so the check below has something to hold
        assert all(len(s) == 1 for s in split_of_hash.values())


def test_max_side_downscales_once_at_ingest(data_bad_tree: Path, tmp_path: Path) -> None:
    ingest(data_bad_tree, tmp_path / "o", IngestOptions(max_side=20, workers=1), **QUIET)
    rows = _all_rows(tmp_path / "o")
    assert rows
    for r in rows:
        assert max(r["width"], r["height"]) == 20
        assert Image.open(io.BytesIO(r["image"])).size == (r["width"], r["height"])


def test_strict_fails_and_writes_no_shards(data_bad_tree: Path, tmp_path: Path) -> None:
    from pipelines.data.ingest_options import IngestError

    with pytest.raises(IngestError, match="quarantined"):
        ingest(data_bad_tree, tmp_path / "o", IngestOptions(strict=True, workers=1), **QUIET)
    assert (tmp_path / "o" / "quarantine.csv").is_file()
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_rerun_with_same_input_rewrites_nothing(data_bad_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert ingest(data_bad_tree, out, IngestOptions(workers=1), **QUIET).wrote
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert not ingest(data_bad_tree, out, IngestOptions(workers=1), **QUIET).wrote
    # touching a source forces a re-decode; identical results still leave the shards alone
    os.utime(data_bad_tree / "dog" / "plain.png", ns=(1, 1))
    assert ingest(data_bad_tree, out, IngestOptions(workers=1), **QUIET).wrote
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert set(after) == set(stamps)
    changed = {p.name for p in stamps if after[p] != stamps[p]}
    assert changed == {"dataset.json"}  # only the recorded fingerprint changed


def test_different_seed_changes_split_and_removes_stale_shards(data_bad_tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    ingest(data_bad_tree, out, IngestOptions(val=0.3, test=0.3, workers=1), **QUIET)
    assert {p.name.split("-")[0] for p in (out / "shards").iterdir()} == {"train", "val", "test"}
    ingest(data_bad_tree, out, IngestOptions(val=0.3, workers=1), **QUIET)
    assert {p.name.split("-")[0] for p in (out / "shards").iterdir()} == {"train", "val"}


def test_dicom_is_windowed_and_converted(tmp_path: Path) -> None:
    import pydicom  # a dependency (pyproject), so DICOM ingest is always tested
    from pydicom.data import get_testdata_file

    root = tmp_path / "dicom" / "ct"
    root.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "scan one.dcm")
    res = ingest(tmp_path / "dicom", tmp_path / "o", IngestOptions(workers=1), **QUIET)
    assert res.summary["num_images"] == 1 and res.summary["quarantined"] == 0
    row = _all_rows(tmp_path / "o")[0]
    img = Image.open(io.BytesIO(row["image"]))
    assert img.mode == "RGB" and img.size == (pydicom.dcmread(root / "scan one.dcm").Columns, 128)


@pytest.fixture
def data_manifest(tmp_path: Path) -> tuple[Path, Path]:
    """A HAM10000-like manifest: ids without extension, lesion groups of 1-4 images, bad rows."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    n = 0
    for c, label in enumerate(["akiec", "bcc", "nv"]):
        for lesion in range(8):
            for _ in range(1 + (lesion % 4)):
                image_id = f"ISIC_{n:07d}"
                data_random_image(1000 + n, size=(20, 15)).save(img_dir / f"{image_id}.jpg", quality=90)
                rows.append({"lesion_id": f"HAM_{c}{lesion:03d}", "image_id": image_id, "dx": label})
                n += 1
    # the same photo filed under two lesions of one class: the two lesions must share a split
    shutil.copy(img_dir / "ISIC_0000000.jpg", img_dir / "ISIC_dup.jpg")
    rows.append({"lesion_id": "HAM_0007", "image_id": "ISIC_dup", "dx": "akiec"})
    rows.append({"lesion_id": "HAM_9999", "image_id": "ISIC_missing", "dx": "nv"})  # no file
    data_random_image(9998, size=(20, 15)).save(img_dir / "ISIC_unknown.jpg")
    rows.append({"lesion_id": "HAM_9998", "image_id": "ISIC_unknown", "dx": ""})  # no label
    manifest = tmp_path / "meta.csv"
    pl.DataFrame(rows).write_csv(manifest)
    return manifest, img_dir


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_groups_and_duplicates_never_straddle_splits(data_manifest, tmp_path: Path, fmt: str) -> None:
    manifest, img_dir = data_manifest
    if fmt == "parquet":
        pl.read_csv(manifest, infer_schema=False).write_parquet(manifest := tmp_path / "meta.parquet")
    spec = ManifestSpec(manifest, img_dir, "image_id", "dx", "lesion_id")
    for seed in range(3):
        out = tmp_path / f"{fmt}{seed}"
        res = ingest(spec, out, IngestOptions(val=0.25, test=0.25, seed=seed, workers=1), **QUIET)
        s = res.summary
        assert s["num_listed"] == 63 and s["quarantined"] == 2 and s["num_images"] == 61
        assert dict(Counter(_quarantine(out)["reason"])) == {"missing_file": 1, "missing_label": 1}
        assert s["duplicate_groups"] == 1
        rows = _all_rows(out)
        for key in ("source_group", "image_id", "group"):
            splits_of = defaultdict(set)
            for r in rows:
                splits_of[r[key]].add(r["split"])
            assert all(len(v) == 1 for v in splits_of.values()), key
        split_of = {r["source_group"]: r["split"] for r in rows}
        assert split_of["HAM_0000"] == split_of["HAM_0007"]  # joined by the duplicate photo
        for split in ("train", "val", "test"):
            assert s["counts"][split]["total"] > 0 and all(v > 0 for v in s["counts"][split].values())
        lo, hi = s["index_ranges"]["train"]
        assert lo == 0 and hi == s["counts"]["train"]["total"]  # train rows are 0..n_train-1


def test_manifest_with_declared_classes_quarantines_the_rest(data_manifest, tmp_path: Path) -> None:
    manifest, img_dir = data_manifest
    spec = ManifestSpec(manifest, img_dir, "image_id", "dx", "lesion_id")
    res = ingest(spec, tmp_path / "o", IngestOptions(classes=["nv", "bcc"], workers=1), **QUIET)
    assert res.summary["classes"] == {"nv": 0, "bcc": 1}
    reasons = Counter(_quarantine(tmp_path / "o")["reason"])
    assert reasons["unknown_label"] == 20 + 1  # 20 akiec images, the akiec duplicate
    assert reasons["missing_label"] == 1  # the empty label


def test_bundled_sample_ingests_cleanly(data_sample_ingested: Path, data_sample_btmd: Path) -> None:
    s = json.loads((data_sample_ingested / "dataset.json").read_text())
    files = [p for p in data_sample_btmd.rglob("*") if p.is_file()]
    assert s["quarantined"] == 0 and s["num_images"] == len(files)
    assert s["classes"] == {"glioma": 0, "meningioma": 1, "notumor": 2, "pituitary": 3}
    assert s["duplicate_groups"] >= 3
    for cls, cid in s["classes"].items():
        n = sum(s["counts"][split][cls] for split in ("train", "val", "test"))
        assert n == len(list((data_sample_btmd / cls).iterdir()))
        assert s["counts"]["val"][cls] > 0 and s["counts"]["test"][cls] > 0


def test_cli_ingests_a_manifest_and_reports_counts(data_manifest, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from msmae_cli import app

    manifest, img_dir = data_manifest
    args = ["ingest", "--manifest", str(manifest), "--image-root", str(img_dir), "--image-col", "image_id",
            "--label-col", "dx", "--group-col", "lesion_id", "--decode-workers", "1", "--no-progress"]
    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert first.exit_code == 0, first.output
    assert "61 images kept, 2 quarantined, 1 duplicate groups" in first.output
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o")])
    assert again.exit_code == 0 and "nothing rewritten" in again.output
    strict = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), "--strict"])
    assert strict.exit_code == 1 and "--strict" in strict.output


def test_default_decode_workers_follow_the_cpus_this_process_may_use() -> None:
    """In a pod os.cpu_count() is the node's core count; the default must follow what the process
    may actually use (here: its CPU affinity pinned to one core, as a CPU limit would cap it)."""
    import subprocess
    import sys

    code = "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); from pipelines.data.ingest import IngestOptions; print(IngestOptions().workers)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "1"
