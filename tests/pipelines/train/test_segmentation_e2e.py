"""1 + 1 epochs on the bundled HAM10000 sample with masks: pre-training, then `msmae segment` on Ray Train from its
checkpoint, judged (quality gate against trivial masks), registered, loaded back as a pyfunc from the registry, a mask
returned at the input's size; then the registered version, standing as champion, loaded from its weights file and
scored on the same validation images as a challenger."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[3]
SAMPLE = REPO / "data" / "sample" / "ham10000"
TINY = {
    "data.img_size": 32, "model.patch_size": 8, "scaling.workers": 2, "checkpoint.max_failures": 0,
    "pretrain.epochs": 1, "pretrain.warmup_epochs": 0, "pretrain.batch_size": 8, "pretrain.masking.sam_start": 1,
    "segment.epochs": 1, "segment.warmup_epochs": 0, "segment.batch_size": 8,
    "tracking.model_name": "msmae-seg-e2e", "tracking.experiment": "msmae-seg-e2e",
}


@pytest.fixture(scope="module")
def seg_ham_ingested(tmp_path_factory) -> Path:
    """The HAM10000 sample ingested with its lesion masks (val 0.25, test 0.15, split by lesion)."""
    from pipelines.data.ingest import IngestOptions, ingest
    from pipelines.data.sources import ManifestSpec

    out = tmp_path_factory.mktemp("ham_masks")
    spec = ManifestSpec(SAMPLE / "metadata.csv", SAMPLE / "images", "image_id", "dx", "lesion_id")
    ingest(spec, out, IngestOptions(val=0.25, test=0.15, seed=0, workers=1, masks=str(SAMPLE / "masks")), progress=False, log=lambda _: None)
    return out


@pytest.mark.slow  # two Ray Train runs and the registry: ~150 s, the largest test the fast loop had
def test_pretrain_then_segment_registers_a_pyfunc_that_returns_masks_at_the_inputs_size(ray_local, seg_ham_ingested, tmp_path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config
    from pipelines.data.dataset import IngestedDataset
    from pipelines.train.segment import run_segmentation
    from pipelines.train.stages import train_stages

    dataset = IngestedDataset.load(seg_ham_ingested)
    assert dataset.has_masks and dataset.split_size("test") > 0
    cfg = load_config("demo", values=TINY)
    pretrained = train_stages(cfg, dataset, tmp_path / "pretrain", "seg-e2e", stages=("pretrain",), log=lambda _: None).pretrain_checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lines: list[str] = []
    outcome = run_segmentation(seg_ham_ingested, cfg, tmp_path / "work", uri, init_checkpoint=pretrained, log=lines.append)

    # One epoch at 32 px rarely beats "everything is lesion" with 95 % confidence on 10 images: the alias follows the gate.
    assert (outcome.model_name, outcome.version) == ("msmae-seg-e2e", "1")
    assert 0.0 <= outcome.val["dice"] <= 1.0 and outcome.val["images"] == dataset.split_size("val")
    assert outcome.test is not None and outcome.test["images"] == dataset.split_size("test")
    client = MlflowClient(uri)
    history = client.get_metric_history(outcome.mlflow_run_id, "segment/val_dice")
    assert [m.step for m in history] == [0]
    run = client.get_run(outcome.mlflow_run_id)
    assert "final_test/dice" in run.data.metrics and run.data.tags["msmae.task"] == "segmentation"
    assert "plots/segmentation_contours.png" in [a.path for a in client.list_artifacts(outcome.mlflow_run_id, "plots")]
    version = client.get_model_version("msmae-seg-e2e", "1")
    assert version.tags["task"] == "segmentation" and "Dice" in version.description
    _assert_the_gate_is_recorded(dataset, outcome, version, run, client, lines)

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/msmae-seg-e2e/1")
    image = Image.open(SAMPLE / "images" / sorted(p.name for p in (SAMPLE / "images").iterdir())[0]).resize((101, 77))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    out = served.predict(pd.DataFrame({"image": [buffer.getvalue(), np.asarray(image)[:51, :63]]}))
    assert out["ok"].tolist() == [True, True]
    assert out["mask"][0].shape == (77, 101) and out["mask"][1].shape == (51, 63)
    with Image.open(io.BytesIO(out["mask_png"][0])) as png:
        assert png.size == (101, 77)

    # msmae predict with the segmenter: one row per file (a non-image included), PNG masks at each image's size
    from pipelines.serve.segment_predict import is_segmenter, predict_masks

    folder = tmp_path / "to_segment"
    (folder / "sub").mkdir(parents=True)
    for k, name in enumerate(sorted(p.name for p in (SAMPLE / "images").iterdir())[:3]):
        Image.open(SAMPLE / "images" / name).resize((61 + k, 45)).save(folder / ("sub" if k else "") / f"{k}.png")
    (folder / "notes.txt").write_text("not an image")
    assert is_segmenter("models:/msmae-seg-e2e/1") and is_segmenter(outcome.checkpoint)
    summary = predict_masks("models:/msmae-seg-e2e/1", folder, tmp_path / "predictions", masks_dir=tmp_path / "masks")
    assert (summary["images"], summary["unreadable"], summary["masks_written"]) == (4, 1, 3)
    with Image.open(tmp_path / "masks" / "sub" / "2.png.png") as png:
        assert png.size == (63, 45)

    _assert_the_champion_is_scored_on_the_same_images(dataset, outcome, client)


def _assert_the_gate_is_recorded(dataset, outcome, version, run, client, lines: list[str]) -> None:
    """The gate's baseline is the all-lesion mask's mean Dice on the validation masks (computed here independently),
    and the verdict is the same in the printed line, the run's tag, promotion.json, the version's tags and its card."""
    from pipelines.data.masks import decode_mask

    shares = np.array([decode_mask(r["mask"], (0, 0)).mean() for r in dataset.rows("val") if r.get("mask") is not None])
    tags = version.tags
    assert tags["quality_gate.baseline"] == "everything is lesion"  # every sample image has a lesion: "nothing" scores 0
    assert float(tags["quality_gate.baseline_dice"]) == pytest.approx(float(np.mean(2 * shares / (1 + shares))), abs=1e-6)
    passed = float(tags["quality_gate.dice_lower"]) > float(tags["quality_gate.baseline_dice"])
    assert tags["quality_gate"] == ("passed" if passed else "failed") and float(tags["quality_gate.dice_lower"]) <= outcome.val["dice"]
    assert outcome.alias == ("champion" if passed else None) and "champion_comparison.margin" not in tags  # no champion before it
    assert tags["promotion"] == run.data.tags["msmae.promotion"] == outcome.why
    assert f"promotion: {outcome.why}" in lines and f"quality gate {tags['quality_gate']} on {len(shares)} val images" in outcome.why
    assert "## Promotion" in version.description and outcome.why in version.description
    assert "promotion.json" in [a.path for a in client.list_artifacts(outcome.mlflow_run_id)]


def _assert_the_champion_is_scored_on_the_same_images(dataset, outcome, client) -> None:
    """Version 1 made @champion; a challenger that is exactly right on every validation image (Dice 1) is judged
    against it: the champion, loaded from its weights file alone, scores the Dice the run measured, on the same
    images, and loses; a champion of another dataset is never compared."""
    from pipelines.serve import segment_promotion
    from pipelines.serve.segment_evaluate import MaskReport, evaluate_masks
    from pipelines.serve.segment_registry import registered_predictor

    client.set_registered_model_alias("msmae-seg-e2e", "champion", "1")
    champion = evaluate_masks(registered_predictor("msmae-seg-e2e", "1"), dataset, "val")
    assert champion.scalars()["dice"] == pytest.approx(outcome.val["dice"], abs=1e-12)
    order = np.argsort(champion.index)[::-1]  # another order than the champion's: matched by image, not by position
    perfect = MaskReport("val", np.ones(len(order)), np.ones(len(order)), 0, 0, [], champion.index[order], champion.lesion_share[order])
    lines: list[str] = []
    decision = segment_promotion.judge("msmae-seg-e2e", perfect, dataset, dataset.fingerprint, "val_dice", lines.append)
    c = decision.comparison
    assert decision.promoted and decision.gate.passed and c is not None and c.champion_version == "1"
    assert c.images == outcome.val["images"] and c.champion == pytest.approx(outcome.val["dice"], abs=1e-12)
    assert c.margin == pytest.approx(1 - outcome.val["dice"]) and c.ci_low <= c.margin <= c.ci_high
    assert lines and lines[0].startswith("champion comparison: val_dice 1.0000 vs champion v1")
    assert float(segment_promotion.decision_tags(decision)["champion_comparison.margin"]) == pytest.approx(c.margin, abs=1e-6)
    other = segment_promotion.judge("msmae-seg-e2e", perfect, dataset, "b" * 64, "val_dice", lines.append)
    assert other.alias is None and other.comparison is None and "another dataset" in other.reason
