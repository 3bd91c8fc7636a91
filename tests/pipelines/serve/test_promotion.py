"""Issue 27: the quality gate, the champion's compatibility, the paired comparison, calibration only when it helps.

Pure numpy on made-up predictions; the same rules against a real registry (a really trained model,
a real SQLite MLflow store, the champion scored on the same split by Ray Data) are in
``test_model_deliverable.py``."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.serve import calibration, promotion

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _labels(n: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(CLASSES), n)


def _probs_right(labels: np.ndarray, right: float, seed: int = 1) -> np.ndarray:
    """Probabilities whose top class is the true one for a share ``right`` of the images, another class otherwise."""
    rng = np.random.default_rng(seed)
    preds = np.where(rng.random(len(labels)) < right, labels, (labels + rng.integers(1, len(CLASSES), len(labels))) % len(CLASSES))
    return np.eye(len(CLASSES))[preds] * 0.6 + 0.1


def test_a_model_predicting_one_class_for_everything_fails_the_gate_however_common_that_class_is():
    labels = np.r_[np.zeros(150, dtype=int), np.ones(30, dtype=int), np.full(20, 2), np.full(20, 3)]  # 68 % glioma
    everything_glioma = np.tile(np.eye(4)[0], (len(labels), 1))
    gate = promotion.quality_gate(everything_glioma, labels, CLASSES, train_counts=[500, 100, 70, 60])
    assert not gate.passed
    assert gate.accuracy == pytest.approx(150 / 220)  # it looks good by accuracy alone ...
    assert gate.balanced_accuracy == pytest.approx(0.25) and gate.majority_class == "glioma"
    assert "does not clear chance 0.250" in gate.reason and "majority-class baseline 0.682" in gate.reason
    decision = promotion.decide(gate, "msmae-btmd", None, None, None)
    assert decision.alias is None and decision.reason.startswith("not promoted: quality gate failed on 220 val images")


def test_a_clearly_better_than_chance_model_passes_and_a_marginal_one_does_not():
    labels = _labels(200)
    good = promotion.quality_gate(_probs_right(labels, 0.8), labels, CLASSES)
    assert good.passed and good.balanced_accuracy_lower > 0.25 and good.accuracy_lower > good.majority_accuracy
    assert "quality gate passed on 200 val images" in good.reason
    # 40 images, 35 % right: above chance as a point estimate, not with 95 % confidence
    few = np.repeat(np.arange(4), 10)
    right = np.concatenate([np.arange(10) < k for k in (4, 4, 3, 3)])  # 14 of 40, spread over the classes
    marginal = promotion.quality_gate(np.eye(4)[np.where(right, few, (few + 1) % 4)], few, CLASSES)
    assert marginal.balanced_accuracy == pytest.approx(0.35) and not marginal.passed
    assert promotion.decide(marginal, "m", None, None, None).alias is None


def test_wilson_lower_bound_matches_the_textbook_value():
    assert promotion.wilson_lower(81, 263) == pytest.approx(0.2553, abs=1e-4)  # Wilson 1927 / Newcombe 1998 style check
    assert promotion.wilson_lower(0, 10) == 0.0 and promotion.wilson_lower(0, 0) == 0.0
    assert 0.6 < promotion.wilson_lower(10, 10) < 0.75  # all right on 10 images is not certainty


def test_paired_bootstrap_of_a_model_against_itself_is_exactly_zero_and_a_better_one_is_positive():
    labels = _labels(300)
    a = _probs_right(labels, 0.6)
    same = promotion.paired_bootstrap(a, a, labels, "val_macro_f1", "3")
    assert same.margin == 0 and same.ci_low == 0 and same.ci_high == 0 and not same.wins
    better = _probs_right(labels, 0.8, seed=2)
    c = promotion.paired_bootstrap(better, a, labels, "val_macro_f1", "3")
    assert c.wins and c.ci_low > 0 and c.ci_low < c.margin < c.ci_high
    assert c.challenger == pytest.approx(promotion.metric_value(better, labels, "macro_f1"))
    assert "margin +" in c.line() and "on the same 300 images" in c.line()
    auc = promotion.paired_bootstrap(better, a, labels, "val_macro_auc", "3", resamples=50)
    assert auc.margin > 0


def test_metric_values_agree_with_the_training_report():
    import torch

    import msmae

    labels = _labels(150)
    probs = np.random.default_rng(5).dirichlet(np.ones(4), 150)
    report = msmae.classification_report(torch.from_numpy(probs), torch.from_numpy(labels), 4)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert promotion.metric_value(probs, labels, name) == pytest.approx(getattr(report, name)), name


def test_a_champion_of_other_classes_or_another_dataset_is_left_in_place_with_what_to_do():
    tags = {"class_names": ",".join(CLASSES), "dataset_fingerprint": "aaaa1111"}
    assert promotion.incompatibility(tags, CLASSES, "aaaa1111") is None
    other_classes = promotion.incompatibility(tags, ["benign", "malignant", "normal"], "bbbb")
    assert other_classes and "benign,malignant,normal" in other_classes
    other_data = promotion.incompatibility(tags, CLASSES, "bbbb2222")
    assert other_data and "another dataset" in other_data
    labels = _labels(200)
    gate = promotion.quality_gate(_probs_right(labels, 0.9), labels, CLASSES)
    decision = promotion.decide(gate, "msmae-demo", "2", other_classes, None)
    assert decision.alias is None and "msmae-demo@champion (version 2) stays" in decision.reason and "--model-name" in decision.reason


def test_the_champion_moves_only_to_a_version_that_beats_it_on_the_same_images():
    labels = _labels(200)
    champion_probs = _probs_right(labels, 0.6)
    gate = promotion.quality_gate(champion_probs, labels, CLASSES)
    worse = promotion.paired_bootstrap(_probs_right(labels, 0.45, seed=7), champion_probs, labels, "val_macro_f1", "1")
    kept = promotion.decide(gate, "m", "1", None, worse)
    assert kept.alias == promotion.CHALLENGER and "champion version 1 kept" in kept.reason
    better = promotion.paired_bootstrap(_probs_right(labels, 0.8, seed=7), champion_probs, labels, "val_macro_f1", "1")
    moved = promotion.decide(gate, "m", "1", None, better)
    assert moved.promoted and "replaces version 1" in moved.reason
    assert moved.to_dict()["comparison"]["margin"] == pytest.approx(better.margin)


def test_a_temperature_that_raises_validation_ece_is_not_applied():
    # Perfectly calibrated top label (confidence 0.7, 70 % right: ECE 0), but the wrong answers' true class always
    # gets 0.25: the NLL-optimal temperature differs from 1 and moves the confidence away from 0.7.
    n = 1000
    labels = np.zeros(n, dtype=int)
    probs = np.tile([0.7, 0.25, 0.05], (n, 1))
    wrong = np.arange(n) < 300
    labels[wrong] = 1
    choice = calibration.choose_temperature(probs, labels)
    assert choice.ece_before == pytest.approx(0.0, abs=1e-9)
    assert abs(choice.fitted - 1.0) > 0.05 and choice.ece_fitted > choice.ece_before
    assert not choice.applied and choice.temperature == 1.0
    assert "kept T = 1" in choice.line()


def test_a_temperature_that_lowers_validation_ece_is_applied():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2000, 4))
    labels = np.array([rng.choice(4, p=np.exp(z) / np.exp(z).sum()) for z in logits])
    overconfident = np.exp(logits * 2.5) / np.exp(logits * 2.5).sum(1, keepdims=True)
    choice = calibration.choose_temperature(overconfident, labels)
    assert choice.applied and choice.temperature == choice.fitted == pytest.approx(2.5, rel=0.15)
    assert choice.ece_fitted < choice.ece_before


def test_against_a_real_registry_another_datasets_champion_stays_and_an_unloadable_one_is_not_replaced(tmp_path):
    """A real SQLite MLflow store whose champion is a version of another dataset (its tags as ``register_model``
    writes them): never compared, never replaced. A champion of this dataset whose files are gone: not replaced
    either, and the reason says so (the run's model is still registered by the caller)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    client.create_registered_model("msmae-shared")
    gone = tmp_path / "no-such-model"
    version = client.create_model_version("msmae-shared", str(gone), tags={"class_names": ",".join(CLASSES), "dataset_fingerprint": "a" * 64})
    client.set_registered_model_alias("msmae-shared", promotion.CHAMPION, version.version)
    labels = _labels(200)
    good = _probs_right(labels, 0.85)
    other = promotion.judge("msmae-shared", good, labels, np.arange(200), CLASSES, "b" * 64, "val_macro_f1", dataset=None)
    assert other.alias is None and other.champion_version == "1" and "another dataset" in other.reason
    unloadable = promotion.judge("msmae-shared", good, labels, np.arange(200), CLASSES, "a" * 64, "val_macro_f1", dataset=None)
    assert unloadable.alias is None and "could not be loaded and scored" in unloadable.reason
    assert str(client.get_model_version_by_alias("msmae-shared", promotion.CHAMPION).version) == "1"
    first = promotion.judge("msmae-new", good, labels, np.arange(200), CLASSES, "b" * 64, "val_macro_f1", dataset=None)
    assert first.promoted and first.reason == "@champion: first version of msmae-new to pass the quality gate"
