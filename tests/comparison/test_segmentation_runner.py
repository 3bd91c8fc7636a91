"""The one-process segmentation comparison: a segmenter learns a synthetic lesion, encoders are paired image by image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from comparison.bundle import save_bundle
from comparison.segmentation import SegmentRecipe, paired_mean_ci, segment_data, train_segmenter
from tests.comparison.test_lesion_runner import _bundle_with_masks

import msmae


def test_a_segmenter_learns_the_bright_square_and_only_images_with_masks_count(device):
    bundle, masks = _bundle_with_masks()
    data = segment_data(bundle, 32, device)
    assert len(data.train) == sum(m is not None for m, s in zip(masks, bundle.split.tolist()) if s == 0)
    preset = msmae.get_preset("tiny", 32, 8)
    record = train_segmenter(None, preset, data, SegmentRecipe(epochs=8, batch_size=16, blr=3e-3, warmup=1.0), seed=0, device=device)
    assert len(record["per_image"]["test_dice"]) == len(data.test) and record["curve"][-1]["train_loss"] < record["curve"][0]["train_loss"]
    assert record["val"]["dice"] == pytest.approx(max(c["val_dice"] for c in record["curve"]))  # the selected state is the best one
    assert record["test"]["dice"] > 0.45  # the square covers a quarter of the image: predicting all of it scores 0.4


def test_paired_ci_is_centred_on_the_mean_difference_and_excludes_zero_for_a_clear_gain():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.4, 0.6, 200)
    mean, lo, hi = paired_mean_ci(b + 0.1 + rng.normal(0, 0.01, 200), b)
    assert lo < mean < hi and mean == pytest.approx(0.1, abs=0.01) and lo > 0
    with pytest.raises(ValueError, match="same non-empty shape"):
        paired_mean_ci(b, b[:10])


def test_the_comparison_script_runs_two_encoders_and_writes_the_table(tmp_path, device):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_segmentation

    bundle, _ = _bundle_with_masks()
    save_bundle(bundle, tmp_path / "b.pt")
    result = compare_segmentation.main(["--bundle", str(tmp_path / "b.pt"), "--out", str(tmp_path / "r.json"), "--encoders", "mae", "scratch",
                                        "--seeds", "0", "--img-size", "32", "--batch-size", "16", "--pretrain-epochs", "1",
                                        "--segment-epochs", "1", "--device", str(device), "--figure", str(tmp_path / "f.png")])
    assert [r["encoder"] for r in result["runs"]] == ["mae", "scratch"]
    assert "| mae |" in result["table"] and "Dice − scratch" in result["table"] and "Trivial masks" in result["table"] and (tmp_path / "f.png").stat().st_size > 0
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["per_image"]["test_dice"]
    assert "examples" in result["runs"][0] and result["runs"][1]["examples"] is not None

    # a second call with the same settings runs nothing again (resumable), and keeps the per-image scores
    before = json.loads((tmp_path / "r.json").read_text())["runs"]
    again = compare_segmentation.main(["--bundle", str(tmp_path / "b.pt"), "--out", str(tmp_path / "r.json"), "--encoders", "mae", "scratch",
                                       "--seeds", "0", "--img-size", "32", "--batch-size", "16", "--pretrain-epochs", "1",
                                       "--segment-epochs", "1", "--device", str(device)])
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in before]
    assert again["table"] == result["table"]


def test_the_summary_gives_seed_spread_every_pair_of_encoders_and_the_trivial_masks():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import compare_segmentation
    from comparison.segmentation import mean_ci

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, 200)
    runs = []
    for encoder, shift in (("msmae_attention", 0.05), ("mae", 0.0), ("scratch", -0.05)):
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            dice = np.clip(base + shift + jitter, 0, 1)
            runs.append({"encoder": encoder, "seed": seed, "val": {"dice": 0.8}, "test": {"dice": float(dice.mean()), "iou": float((dice / (2 - dice)).mean())},
                         "per_image": {"test_dice": dice.tolist(), "test_iou": (dice / (2 - dice)).tolist()}})
    table = compare_segmentation.summarise(runs, ["msmae_attention", "mae", "scratch"], mean_ci, paired_mean_ci, np.full(200, 0.25))
    row = next(line for line in table.splitlines() if line.startswith("| msmae_attention |"))
    assert f"{np.mean(base + 0.05):.4f} ± {np.std([-0.01, 0.01], ddof=1):.4f}" in row  # mean ± sd over the two seeds
    assert "+0.1000 [+0.1000, +0.1000]" in row  # a constant paired difference to scratch has a CI of width 0
    pair = next(line for line in table.splitlines() if line.startswith("| msmae_attention − mae |"))
    assert pair.split("|")[2].strip() == "+0.0500 [+0.0500, +0.0500]"
    assert pair.split("|")[4].strip() == "+0.0500, +0.0500"  # seed by seed
    to_scratch = next(line for line in table.splitlines() if line.startswith("| mae − scratch |"))
    assert to_scratch.split("|")[4].strip() == "+0.0500, +0.0500"
    assert "everything is lesion Dice 0.4000" in table and "nothing is lesion Dice 0.0000" in table  # 2p/(1+p) at p = 0.25
