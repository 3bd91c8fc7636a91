"""The checkpoint format and the ingested-dataset reader: what every other module loads through."""

from __future__ import annotations

import json

import pytest
import torch

import msmae
from pipelines import checkpoint
from pipelines.data.dataset import IngestedDataset


def _write(tmp_path, stage: str, img_size: int = 32):
    preset = msmae.get_preset("tiny", img_size)
    model = msmae.build_classifier(preset, 3) if stage == "finetune" else msmae.build_pretrain_model(preset, 3)
    table = msmae.AttentionTable(5, preset.grid)
    directory = checkpoint.write_checkpoint(
        tmp_path / stage, stage=stage, model_state=model.state_dict(), optimizer_state={}, table=table, epoch=4, best=0.5,
        preset=preset, class_names=["a", "b", "c"], metrics={"epoch": 4}, config={"data": {"img_size": img_size}},
    )
    return directory, model


def test_a_classifier_comes_back_at_the_size_it_was_trained_at(tmp_path):
    directory, model = _write(tmp_path, "finetune", img_size=32)
    loaded, names = checkpoint.load_classifier(directory)
    assert names == ["a", "b", "c"] and loaded.preset.img_size == 32 and not loaded.training
    images = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(loaded(images), model(images))
    assert json.loads((directory / checkpoint.META_FILE).read_text())["stage"] == "finetune"


def test_a_pretraining_checkpoint_initialises_a_classifiers_encoder(tmp_path):
    directory, pretrain = _write(tmp_path, "pretrain")
    assert checkpoint.is_checkpoint(directory)
    classifier = msmae.build_classifier(msmae.get_preset("tiny", 32), 3)
    checkpoint.load_encoder_into(classifier, directory)
    assert torch.equal(classifier.patch_embed.proj.weight, pretrain.encoder.patch_embed.proj.weight)
    assert isinstance(checkpoint.load_pretrain_model(directory), msmae.MSMAEPretrainModel)


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        checkpoint.load_classifier(tmp_path)


def test_the_ingested_sample_reads_as_a_typed_dataset(data_sample_ingested):
    dataset = IngestedDataset.load(data_sample_ingested)
    assert dataset.class_names == ["glioma", "meningioma", "notumor", "pituitary"]
    assert [dataset.split_size(s) for s in ("train", "val", "test")] == [420, 120, 60]
    assert dataset.non_empty_splits() == ["train", "val", "test"] and dataset.fingerprint
    assert all(f.is_file() for f in dataset.shard_files("train"))
    with pytest.raises(ValueError, match="no 'holdout' split"):
        dataset.shard_files("holdout")


def test_a_folder_without_dataset_json_says_how_to_make_one(tmp_path):
    assert not IngestedDataset.is_ingested(tmp_path)
    with pytest.raises(FileNotFoundError, match="msmae ingest"):
        IngestedDataset.load(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        IngestedDataset.load(tmp_path)
