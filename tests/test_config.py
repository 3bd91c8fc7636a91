"""Configuration: presets load, overrides apply, bad values are rejected naming the key."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError, load_config


@pytest.mark.parametrize("preset", ["demo", "btmd-base"])
def test_shipped_presets_validate(preset):
    config = load_config(preset)
    assert config.finetune.masking.mask_ratio == 0.45
    assert config.flat()["pretrain.masking.throw_ratio"] == 0.30


def test_set_overrides_parse_values_as_yaml():
    config = load_config("demo", ["finetune.epochs=50", "pretrain.masking.mask_ratio=0.5", "finetune.sam=false"])
    assert config.finetune.epochs == 50
    assert config.pretrain.masking.mask_ratio == 0.5
    assert config.finetune.sam is False


@pytest.mark.parametrize(
    "override,named",
    [
        ("finetune.epochs=0", "finetune.epochs"),
        ("pretrain.masking.mask_ratio=1.5", "pretrain.masking.mask_ratio"),
        ("finetune.masking.throw_ratio=-0.1", "finetune.masking.throw_ratio"),
        ("model.preset=huge", "model.preset"),
        ("finetune.epoch=3", "finetune.epoch"),
        ("scaling.workers=two", "scaling.workers"),
    ],
)
def test_bad_values_are_rejected_with_the_key_named(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert named in str(err.value)


def test_ratios_that_leave_no_visible_tokens_are_rejected():
    with pytest.raises(ConfigError, match="finetune.masking"):
        load_config("demo", ["finetune.masking.mask_ratio=0.7", "finetune.masking.throw_ratio=0.29"])


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="demo"):
        load_config("nope")


def test_malformed_set_is_explained():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("demo", ["finetune.epochs"])
