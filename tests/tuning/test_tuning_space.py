"""The search space: the masking constraint holds for every sampled trial; bad spaces are named."""

from __future__ import annotations

import optuna
import pytest

import msmae
from pipelines.config import load_config
from tuning.space import SpaceError, check_space, load_space

SHIPPED = "configs/space-masking.yaml"


def test_every_sampled_trial_of_the_shipped_space_is_a_valid_run_configuration():
    space = load_space(SHIPPED)
    visible_low = {m.stage: m.visible[0] for m in space.masking}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    define = space.define_by_run()
    num_patches = msmae.get_preset("tiny", 64).num_patches

    def objective(trial):
        overrides = define(trial)
        cfg = load_config("demo", values=overrides)  # the config validator accepts it
        for stage in ("pretrain", "finetune"):
            masking = getattr(cfg, stage).masking
            assert masking.mask_ratio + masking.throw_ratio <= 1 - visible_low[stage] + 1e-12
            assert masking.mask_ratio == pytest.approx(overrides[f"{stage}.masking.mask_ratio"])
            kept, masked, thrown = msmae.mask_counts(num_patches, masking.mask_ratio, masking.throw_ratio)
            assert kept >= 1 and masked >= 1 and kept + masked + thrown == num_patches
        return masking.mask_ratio  # something for TPE to chase, so it explores the edges too

    study.optimize(objective, n_trials=300)
    assert len(study.trials) == 300 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_the_shipped_space_passes_the_up_front_check():
    cfg = check_space(load_space(SHIPPED), load_config("demo"))
    assert cfg.model.preset == "tiny"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params:\n  pretrain.blr: {uniform: [1, 2]}\n", "params.pretrain.blr"),
        ("masking:\n  pretrain: {visible: [0.5, 0.2], masked_share: [0.3, 0.9]}\n", "masking.pretrain.visible"),
        ("masking:\n  decoder: {visible: [0.2, 0.5], masked_share: [0.3, 0.9]}\n", "masking.decoder"),
        ("objectve: val_accuracy\n", "unknown top-level keys"),
    ],
)
def test_malformed_spaces_name_the_entry(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError, match=message):
        load_space(path)


def test_a_space_reaching_a_rejected_configuration_is_refused_before_any_trial(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("params:\n  finetune.label_smoothing: {float: [0.0, 1.5]}\n")
    with pytest.raises(SpaceError, match="finetune.label_smoothing"):
        check_space(load_space(path), load_config("demo"))
    path.write_text("params:\n  pretrain.no_such_key: {int: [1, 2]}\n")
    with pytest.raises(SpaceError, match="no_such_key"):
        check_space(load_space(path), load_config("demo"))


def test_ratios_too_small_to_mask_one_patch_are_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("masking:\n  finetune: {visible: [0.2, 0.99], masked_share: [0.05, 0.9]}\n")
    dropping = load_config("demo", ["finetune.masking.strategy=attention"])  # the demo fine-tunes on every token
    with pytest.raises(SpaceError, match="masks no patch"):
        check_space(load_space(path), dropping)
    # A space that can draw a dropping rule is held to its ratios even where the base config uses all tokens.
    path.write_text("masking:\n  finetune: {visible: [0.2, 0.99], masked_share: [0.05, 0.9]}\n"
                    "params:\n  finetune.masking.strategy: {choice: [all, uniform]}\n")
    with pytest.raises(SpaceError, match="masks no patch"):
        check_space(load_space(path), load_config("demo"))


def test_the_segmentation_space_sweeps_pretraining_masking_and_the_segment_lr_for_dice():
    from tuning.sweep import SweepRequest, sweep_base_config

    space = load_space("configs/space-segment.yaml")
    assert (space.objective, space.task) == ("val_dice", "segmentation")
    assert {m.stage for m in space.masking} == {"pretrain"} and "segment.blr" in {p.key for p in space.params}
    cfg = check_space(space, load_config("demo"))
    base = sweep_base_config(SweepRequest(data=".", space="configs/space-segment.yaml", trials=1, config=cfg), space)
    assert base.segment.metric == "val_dice" and base.checkpoint.metric == load_config("demo").checkpoint.metric
    assert load_space(SHIPPED).task == "classification"
