"""The segmenter's promotion: the quality gate against trivial masks, the paired comparison, the decision and its tags.

Pure numpy on made-up per-image Dice; the same rules against a real registry (a really trained
segmenter, registered, loaded back from its weights file and scored on the same split) are in
``tests/pipelines/train/test_segmentation_e2e.py``."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.serve import promotion, segment_promotion
from pipelines.serve.segment_evaluate import dice_iou_np


def _shares(n: int = 120, seed: int = 0) -> np.ndarray:
    """Lesion shares like dermoscopy crops': mostly 5-60 % of the image."""
    return np.random.default_rng(seed).uniform(0.05, 0.6, n)


def test_trivial_mask_dice_matches_scoring_the_masks_themselves():
    rng = np.random.default_rng(3)
    truths = [rng.random((17, 23)) < q for q in (0.0, 0.1, 0.5, 0.9)]
    shares = np.array([t.mean() for t in truths])
    trivial = segment_promotion.trivial_dice(shares)
    for k, t in enumerate(truths):
        assert trivial[segment_promotion.ALL_LESION][k] == pytest.approx(dice_iou_np(np.ones_like(t), t)[0])
        assert trivial[segment_promotion.NO_LESION][k] == pytest.approx(dice_iou_np(np.zeros_like(t), t)[0])


def test_an_everything_is_lesion_predictor_fails_the_gate_and_gets_no_alias():
    shares = _shares()
    all_lesion = 2 * shares / (1 + shares)  # what predicting every pixel as lesion scores, image by image
    gate = segment_promotion.quality_gate(all_lesion, shares)
    assert not gate.passed and gate.baseline == segment_promotion.ALL_LESION
    assert gate.dice == pytest.approx(gate.baseline_dice) and gate.dice_lower < gate.baseline_dice
    assert gate.no_lesion_dice == 0.0  # every image has a lesion
    assert gate.reason.startswith("quality gate failed on 120 val images") and "does not clear the trivial mask 'everything is lesion'" in gate.reason
    decision = promotion.decide(gate, "msmae-ham-segmenter", None, None, None)
    assert decision.alias is None and decision.reason.startswith("not promoted: quality gate failed")
    tags = segment_promotion.decision_tags(decision)
    assert tags["quality_gate"] == "failed" and tags["quality_gate.baseline"] == "everything is lesion"
    assert float(tags["quality_gate.dice_lower"]) < float(tags["quality_gate.baseline_dice"]) and "champion_comparison.margin" not in tags


def test_good_masks_pass_the_gate_and_a_marginal_few_do_not():
    shares = _shares()
    good = np.clip(np.random.default_rng(1).normal(0.8, 0.1, len(shares)), 0, 1)
    gate = segment_promotion.quality_gate(good, shares)
    assert gate.passed and gate.dice_lower > gate.baseline_dice and gate.dice_lower < gate.dice
    assert gate.reason.startswith("quality gate passed on 120 val images") and gate.tags()["quality_gate"] == "passed"
    assert promotion.decide(gate, "m", None, None, None).reason == "@champion: first version of m to pass the quality gate"
    # 8 images, mean Dice a little above the all-lesion mask's: better as a point estimate, not with 95 % confidence
    few = _shares(8, seed=2)
    marginal = 2 * few / (1 + few) + np.array([0.3, -0.2, 0.25, -0.15, 0.2, -0.1, 0.1, -0.1])
    gate = segment_promotion.quality_gate(marginal, few)
    assert gate.dice > gate.baseline_dice and not gate.passed


def test_images_without_a_lesion_make_nothing_is_lesion_the_baseline_to_beat():
    shares = np.r_[np.zeros(90), _shares(30)]  # 75 % of the images have no lesion: the empty mask scores 0.75
    gate = segment_promotion.quality_gate(np.full(120, 0.7), shares)
    assert gate.baseline == segment_promotion.NO_LESION and gate.baseline_dice == pytest.approx(0.75) and not gate.passed
    empty = segment_promotion.quality_gate(np.zeros(0), np.zeros(0))
    assert not empty.passed and "no val images with a mask" in empty.reason


def test_paired_dice_difference_against_itself_is_zero_and_a_better_segmenter_takes_champion():
    rng = np.random.default_rng(4)
    champion = np.clip(rng.normal(0.7, 0.15, 150), 0, 1)
    same = promotion.paired_mean_difference(champion, champion, "val_dice", "3")
    assert same.margin == 0 and same.ci_low == same.ci_high == 0 and not same.wins
    better = np.clip(champion + rng.normal(0.05, 0.05, 150), 0, 1)
    c = promotion.paired_mean_difference(better, champion, "val_dice", "3")
    assert c.wins and 0 < c.ci_low < c.margin < c.ci_high and c.images == 150
    gate = segment_promotion.quality_gate(better, _shares(150))
    moved = promotion.decide(gate, "m", "3", None, c)
    assert moved.promoted and "replaces version 3" in moved.reason and "val_dice" in moved.reason
    tags = segment_promotion.decision_tags(moved)
    assert float(tags["champion_comparison.margin"]) == pytest.approx(c.margin, abs=1e-6)
    assert (tags["champion_comparison.ci_low"], tags["champion_comparison.champion_version"]) == (f"{c.ci_low:+.6f}", "3")
    kept = promotion.decide(gate, "m", "3", None, promotion.paired_mean_difference(champion, better, "val_dice", "3"))
    assert kept.alias == promotion.CHALLENGER and "champion version 3 kept" in kept.reason
    assert any("paired bootstrap 95% CI" in line for line in segment_promotion.card_lines(kept))
    with pytest.raises(ValueError, match="same images"):
        promotion.paired_mean_difference(champion, champion[:-1], "val_dice")


def test_a_champion_of_another_dataset_or_task_is_left_in_place_and_scores_are_matched_by_image():
    tags = {"task": "segmentation", "dataset_fingerprint": "a" * 64}
    assert segment_promotion.incompatibility(tags, "a" * 64) is None
    assert "another dataset" in segment_promotion.incompatibility(tags, "b" * 64)
    assert "not a segmenter" in segment_promotion.incompatibility({**tags, "task": "classification"}, "a" * 64)
    shares = _shares()
    gate = segment_promotion.quality_gate(np.full(120, 0.9), shares)
    stays = promotion.decide(gate, "m", "2", segment_promotion.incompatibility(tags, "b" * 64), None)
    assert stays.alias is None and "m@champion (version 2) stays" in stays.reason
    rows = segment_promotion.aligned(np.array([5, 9, 2]), np.array([2, 5, 9]))
    assert rows.tolist() == [1, 2, 0]
    assert segment_promotion.aligned(np.array([5, 9, 2]), np.array([2, 5, 7])) is None
