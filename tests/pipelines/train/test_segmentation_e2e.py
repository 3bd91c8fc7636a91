"""1 + 1 epochs on the bundled HAM10000 sample with masks: pre-training, then `msmae segment` on Ray Train from its
checkpoint, registered, loaded back as a pyfunc from the registry, a mask returned at the input's size."""

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

    assert (outcome.model_name, outcome.version, outcome.alias) == ("msmae-seg-e2e", "1", "champion")
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

    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/msmae-seg-e2e@champion")
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
    assert is_segmenter("models:/msmae-seg-e2e@champion") and is_segmenter(outcome.checkpoint)
    summary = predict_masks("models:/msmae-seg-e2e@champion", folder, tmp_path / "predictions", masks_dir=tmp_path / "masks")
    assert (summary["images"], summary["unreadable"], summary["masks_written"]) == (4, 1, 3)
    with Image.open(tmp_path / "masks" / "sub" / "2.png.png") as png:
        assert png.size == (63, 45)
