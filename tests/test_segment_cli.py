"""`msmae segment` refuses what it cannot train on in seconds, before Ray or MLflow start, with one error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_harness import assert_clean, invoke

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "ham10000"


@pytest.fixture(scope="module")
def ham_without_masks(tmp_path_factory) -> Path:
    from pipelines.data.ingest import IngestOptions, ingest
    from pipelines.data.sources import ManifestSpec

    out = tmp_path_factory.mktemp("ham_plain")
    ingest(ManifestSpec(SAMPLE / "metadata.csv", SAMPLE / "images", "image_id", "dx", "lesion_id"), out,
           IngestOptions(val=0.25, workers=1), progress=False, log=lambda _: None)
    return out


def test_a_dataset_without_masks_is_refused_naming_the_ingest_option(ham_without_masks: Path, tmp_path: Path) -> None:
    result = invoke(["segment", "--data", ham_without_masks, "--workdir", tmp_path / "work"])
    assert_clean(result, 1, ("no lesion masks", "--masks"))
    assert not (tmp_path / "work" / "storage").exists()


def test_raw_images_are_refused_with_the_ingest_command(tmp_path: Path) -> None:
    result = invoke(["segment", "--data", SAMPLE / "images", "--workdir", tmp_path / "work"])
    assert_clean(result, 1, ("not an ingested dataset", "msmae ingest"))


def test_init_must_be_a_checkpoint_folder(ham_without_masks: Path, tmp_path: Path) -> None:
    result = invoke(["segment", "--data", ham_without_masks, "--init", tmp_path, "--workdir", tmp_path / "work"])
    assert_clean(result, 2, ("--init", "not a checkpoint folder"))


def test_segment_settings_are_validated_with_the_key_named(ham_without_masks: Path, tmp_path: Path) -> None:
    result = invoke(["segment", "--data", ham_without_masks, "--set", "segment.metric=val_auc", "--workdir", tmp_path / "work"])
    assert_clean(result, 2, ("segment.metric",))
