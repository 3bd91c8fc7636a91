"""benchmarks/make_bundle.py: an ingest's splits packed into a bundle, and a folder ingested before
near-copies were held in one split refused (its splits can leak)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_bundle_cli", REPO / "benchmarks" / "make_bundle.py")
make_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_bundle)


def test_a_bundle_keeps_the_ingested_splits_and_refuses_a_leaking_ingest(data_sample_ingested, tmp_path):
    from comparison.bundle import load_bundle
    from pipelines.data.dataset import IngestedDataset

    dataset = IngestedDataset.load(data_sample_ingested)
    summary = make_bundle.build(data_sample_ingested, tmp_path / "b.pt", side=32, quality=90, name="sample")
    bundle = load_bundle(tmp_path / "b.pt")
    assert bundle.counts() == {s: dataset.split_size(s) for s in ("train", "val", "test")} == summary["counts"]
    assert summary["near_duplicates"] == dataset.summary["near_duplicates"]

    old = tmp_path / "old-ingest"
    shutil.copytree(data_sample_ingested, old)
    meta = json.loads((old / "dataset.json").read_text())
    del meta["near_duplicates"]  # what an ingest before near-copies were held together wrote
    (old / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit, match="re-ingest into a fresh folder"):
        make_bundle.build(old, tmp_path / "old.pt", side=32, quality=90, name="old")
    assert not (tmp_path / "old.pt").exists()
