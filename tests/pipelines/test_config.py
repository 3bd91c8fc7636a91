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
    config = load_config("demo", ["finetune.epochs=50", "pretrain.masking.mask_ratio=0.5", "finetune.masking.strategy=all"])
    assert config.finetune.epochs == 50
    assert config.pretrain.masking.mask_ratio == 0.5
    assert config.finetune.masking.strategy == "all"


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


@pytest.mark.parametrize(
    "override,named",
    [
        ("data.img_size=60", "data.img_size"),  # not a multiple of the tiny preset's 8 px patches
        ("pretrain.masking.mask_ratio=0.01", "pretrain.masking"),  # masks no patch of 64
        ("pretrain.random_mask_ratio=0.01", "pretrain.random_mask_ratio"),
        ("finetune.masking.throw_ratio=0.54", "finetune.masking"),  # 0.45 + 0.54: no visible patch of 64
    ],
)
def test_rules_across_sections_are_checked_before_anything_runs(override, named):
    with pytest.raises(ConfigError) as err:
        load_config("demo", [override])
    assert named in str(err.value) and "Traceback" not in str(err.value)


def test_all_token_fine_tuning_does_not_need_fine_tuning_ratios_that_mask():
    config = load_config("demo", ["finetune.masking.strategy=all", "finetune.masking.mask_ratio=0.01"])
    assert config.finetune.masking.mask_ratio == 0.01


def test_the_config_crosses_process_boundaries_as_itself_and_typed_values_apply():
    import pickle

    config = load_config("demo")
    assert pickle.loads(pickle.dumps(config)) == config  # what Ray does to send it to a worker or trial
    changed = config.with_values({"finetune.epochs": 3, "pretrain.masking.mask_ratio": 0.5})
    assert (changed.finetune.epochs, changed.pretrain.masking.mask_ratio) == (3, 0.5)
    assert config.finetune.epochs != 3  # the original is untouched
    with pytest.raises(ConfigError, match="finetune.epoch"):
        config.with_values({"finetune.epoch": 3})


def test_the_defaults_are_the_methods():
    from msmae import defaults

    config = load_config("btmd-base")
    assert (config.pretrain.cls_weight, config.pretrain.random_mask_ratio) == (defaults.CLS_WEIGHT, defaults.RANDOM_MASK_RATIO)
    assert (config.finetune.layer_decay, config.finetune.label_smoothing) == (defaults.LAYER_DECAY, defaults.LABEL_SMOOTHING)


def test_a_value_that_is_not_yaml_is_named():
    with pytest.raises(ConfigError, match="finetune.epochs"):
        load_config("demo", ["finetune.epochs=[1"])


def test_masking_strategies_per_stage_and_registers_reach_the_model():
    config = load_config("demo", ["pretrain.masking.strategy=uniform", "finetune.masking.strategy=all", "model.reg_tokens=4"])
    assert (config.pretrain.masking.strategy, config.finetune.masking.strategy) == ("uniform", "all")
    assert config.preset().reg_tokens == 4 and config.flat()["finetune.masking.strategy"] == "all"  # logged as a param
    with pytest.raises(ConfigError, match="pretrain.masking.strategy"):
        load_config("demo", ["pretrain.masking.strategy=all"])
    with pytest.raises(ConfigError, match="strategy"):
        load_config("demo", ["finetune.masking.strategy=random"])
    with pytest.raises(ConfigError, match="pretrain.masking.all_tokens_from"):
        load_config("demo", ["pretrain.masking.all_tokens_from=0.5"])
    assert load_config("demo", ["finetune.masking.all_tokens_from=0.75"]).finetune.masking.all_tokens_from == 0.75


def test_balanced_class_weights_reach_the_training_rule_of_both_stages(data_sample_ingested):
    """finetune/pretrain.class_weights=balanced: the worker's epoch plan weights each class by
    n / (classes * n_class) of the ingested training split; none leaves the loss unweighted."""
    from pipelines.data.dataset import IngestedDataset
    from pipelines.train.worker import StageSpec, epoch_plan

    dataset = IngestedDataset.load(data_sample_ingested)
    counts = dataset.class_counts("train")
    assert sum(counts) == dataset.split_size("train") and len(counts) == dataset.num_classes
    config = load_config("demo", ["finetune.class_weights=balanced", "pretrain.class_weights=balanced"])
    for stage in ("pretrain", "finetune"):
        spec = StageSpec(stage, config, dataset.class_names, sum(counts), class_counts=tuple(counts))
        weights = epoch_plan(spec).class_weights
        assert weights.tolist() == pytest.approx([sum(counts) / (len(counts) * n) for n in counts])
    plain = StageSpec("finetune", load_config("demo"), dataset.class_names, sum(counts), class_counts=tuple(counts))
    assert epoch_plan(plain).class_weights is None
    assert epoch_plan(plain).cls_loss == "logits"  # pretrain.cls_loss: logits by default, the released code's on request
    released = load_config("demo", ["pretrain.cls_loss=softmax_ce"])
    spec = StageSpec("pretrain", released, dataset.class_names, sum(counts), class_counts=tuple(counts))
    assert epoch_plan(spec).cls_loss == "softmax_ce" and released.flat()["pretrain.cls_loss"] == "softmax_ce"
    with pytest.raises(ConfigError, match="pretrain.cls_loss"):
        load_config("demo", ["pretrain.cls_loss=hinge"])
    with pytest.raises(ConfigError, match="finetune.class_weights"):
        load_config("demo", ["finetune.class_weights=inverse"])
