"""Whether a newly registered version may take ``@champion``: the quality gate, the champion's compatibility,
and the champion-vs-challenger comparison on the same held-out split.

Why a gate: a model that predicts one class for everything, or does no better than "always say the
most frequent class", must never be what ``models:/NAME@champion`` answers with. Why the comparison
on this run's own validation split: a metric stored with the champion was measured on *its* run's
split; two models are only comparable on the same images, so the champion is loaded from the
registry and scored here (same dataset fingerprint, hence the same split), and the per-image
predictions are resampled together (a paired bootstrap) for a confidence interval of the margin.

The functions are pure numpy on probabilities and labels, except ``champion_version`` and ``judge`` (read the
registry). The rule itself (``decide``, ``Comparison.wins``) and the per-image pieces (``bootstrap_mean_lower``,
``paired_mean_difference``, ``other_dataset``) serve the segmenter too (``pipelines.serve.segment_promotion``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

CHAMPION = "champion"
CHALLENGER = "challenger"
Z95 = 1.959963984540054  # two-sided 95 %
BOOTSTRAP_RESAMPLES = 1000
GATE_MARGIN = 0.0  # the CI's lower bound must clear the baseline by this much (the CI already carries the sample size)


def wilson_lower(successes: int, n: int, z: float = Z95) -> float:
    """Lower end of the Wilson score interval of a proportion (0 for n == 0): honest at small n and near 0 or 1."""
    if n <= 0:
        return 0.0
    p = successes / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def _metric_from_predictions(labels: np.ndarray, preds: np.ndarray, num_classes: int, metric: str) -> np.ndarray:
    """accuracy / balanced_accuracy / macro_f1 for each row of ``labels``/``preds`` ``[B, N]`` (vectorised over B);
    class averages over the classes present in that row's labels, as ``msmae.classification_report`` does."""
    rows = labels.shape[0]
    flat = (np.arange(rows)[:, None] * num_classes * num_classes + labels * num_classes + preds).ravel()
    cm = np.bincount(flat, minlength=rows * num_classes * num_classes).reshape(rows, num_classes, num_classes).astype(float)
    correct = np.einsum("bcc->bc", cm)
    support, predicted = cm.sum(2), cm.sum(1)
    if metric == "accuracy":
        return correct.sum(1) / np.maximum(support.sum(1), 1)
    present = support > 0
    recall = correct / np.maximum(support, 1)
    if metric == "balanced_accuracy":
        return (recall * present).sum(1) / np.maximum(present.sum(1), 1)
    if metric == "macro_f1":
        precision = correct / np.maximum(predicted, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)
    raise ValueError(f"no per-prediction form of metric {metric!r}")


def metric_value(probs: np.ndarray, labels: np.ndarray, metric: str) -> float:
    """One of ``msmae.HEADLINE_METRICS`` (``val_`` prefix allowed) from probabilities ``[N, C]`` and labels ``[N]``."""
    metric = metric.removeprefix("val_")
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if metric == "macro_auc":
        import torch

        import msmae

        return float(msmae.classification_report(torch.from_numpy(probs), torch.from_numpy(labels), probs.shape[1]).macro_auc)
    return float(_metric_from_predictions(labels[None], probs.argmax(1)[None], probs.shape[1], metric)[0])


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))  # [B, N] image indices, with replacement


def bootstrap_mean_lower(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """The 2.5 % percentile of the mean of per-image ``values`` over images resampled with replacement (NaN when empty)."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return float("nan")
    return float(np.percentile(values[_resamples(len(values), resamples, seed)].mean(1), 2.5))


class Gate(Protocol):
    """What ``decide`` reads of a quality gate (the classifier's ``GateResult``, the segmenter's ``SegmentGateResult``)."""

    @property
    def passed(self) -> bool: ...

    @property
    def reason(self) -> str: ...  # one line


@dataclass(frozen=True)
class GateResult:
    """The quality gate on one split: the model's CI lower bounds against the majority-class baseline and chance."""

    passed: bool
    reason: str  # one line
    accuracy: float
    accuracy_lower: float  # Wilson 95 % lower bound
    balanced_accuracy: float
    balanced_accuracy_lower: float  # paired bootstrap 2.5 % percentile
    majority_class: str
    majority_accuracy: float  # the baseline "always predict the training split's most frequent class"
    chance: float  # 1 / classes present: the baseline's (and any constant predictor's) balanced accuracy
    images: int
    split: str


def quality_gate(probs: np.ndarray, labels: np.ndarray, class_names: list[str], train_counts: list[int] | None = None,
                 split: str = "val", margin: float = GATE_MARGIN, seed: int = 0) -> GateResult:
    """Pass only when the model beats, with 95 % confidence, both the majority-class baseline's accuracy and chance
    balanced accuracy (which is also the baseline's balanced accuracy).

    The baseline predicts the training split's most frequent class (the validation split's when
    ``train_counts`` is not given); its accuracy is that class's share of ``labels``. A model predicting
    one class for everything has balanced accuracy exactly 1/C and never passes."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(probs).argmax(1)
    n, num_classes = len(labels), len(class_names)
    if n == 0:
        return GateResult(False, f"no {split} images to judge the model on", *([float("nan")] * 4), "", float("nan"), float("nan"), 0, split)
    counts = np.asarray(train_counts if train_counts is not None else np.bincount(labels, minlength=num_classes))
    majority = int(counts.argmax())
    majority_acc = float((labels == majority).mean())
    chance = 1.0 / max(1, len(np.unique(labels)))
    accuracy = float((preds == labels).mean())
    acc_lower = wilson_lower(int((preds == labels).sum()), n)
    balanced = float(_metric_from_predictions(labels[None], preds[None], num_classes, "balanced_accuracy")[0])
    idx = _resamples(n, BOOTSTRAP_RESAMPLES, seed)
    balanced_lower = float(np.percentile(_metric_from_predictions(labels[idx], preds[idx], num_classes, "balanced_accuracy"), 2.5))
    failures = []
    if not balanced_lower > chance + margin:
        failures.append(f"balanced accuracy {balanced:.3f} (95% lower bound {balanced_lower:.3f}) does not clear chance {chance:.3f}")
    if not acc_lower > majority_acc + margin:
        failures.append(f"accuracy {accuracy:.3f} (95% lower bound {acc_lower:.3f}) does not clear the majority-class baseline "
                        f"{majority_acc:.3f} (always '{class_names[majority]}')")
    passed = not failures
    reason = (f"quality gate passed on {n} {split} images: balanced accuracy {balanced:.3f} (lower bound {balanced_lower:.3f}) > "
              f"chance {chance:.3f}, accuracy {accuracy:.3f} (lower bound {acc_lower:.3f}) > majority-class {majority_acc:.3f}"
              if passed else f"quality gate failed on {n} {split} images: " + "; ".join(failures))
    return GateResult(passed, reason, accuracy, acc_lower, balanced, balanced_lower, class_names[majority], majority_acc, chance, n, split)


@dataclass(frozen=True)
class Comparison:
    """Challenger minus champion on the same images: the point margin and a paired-bootstrap 95 % interval."""

    metric: str
    challenger: float
    champion: float
    margin: float
    ci_low: float
    ci_high: float
    images: int
    champion_version: str

    @property
    def wins(self) -> bool:
        """The point estimate decides (the interval is reported, not required to exclude 0: with a few hundred
        validation images it rarely would, and a champion that can never be replaced is no better)."""
        return self.margin > 0

    def card_line(self) -> str:
        """The model card's line for this comparison (the classifier's and the segmenter's cards share it)."""
        return (f"- against champion version {self.champion_version}, both scored on the same {self.images} validation images: "
                f"`{self.metric}` {self.challenger:.4f} vs {self.champion:.4f}, margin {self.margin:+.4f} (paired bootstrap 95% CI "
                f"{self.ci_low:+.4f} to {self.ci_high:+.4f})")

    def line(self) -> str:
        return (f"{self.metric} {self.challenger:.4f} vs champion v{self.champion_version} {self.champion:.4f} on the same "
                f"{self.images} images: margin {self.margin:+.4f} (95% CI {self.ci_low:+.4f} to {self.ci_high:+.4f})")


def paired_bootstrap(challenger_probs: np.ndarray, champion_probs: np.ndarray, labels: np.ndarray, metric: str,
                     champion_version: str = "?", resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Comparison:
    """Both models scored on the same resampled images each round: the interval of the difference, not of each."""
    metric = metric.removeprefix("val_")
    labels = np.asarray(labels, dtype=np.int64)
    a, b = np.asarray(challenger_probs, dtype=np.float64), np.asarray(champion_probs, dtype=np.float64)
    if a.shape != b.shape or len(a) != len(labels):
        raise ValueError(f"challenger {a.shape}, champion {b.shape} and labels {labels.shape} are not the same images")
    idx = _resamples(len(labels), resamples if metric != "macro_auc" else min(resamples, 200), seed)
    if metric == "macro_auc":
        diffs = np.array([metric_value(a[i], labels[i], metric) - metric_value(b[i], labels[i], metric) for i in idx])
    else:
        c = a.shape[1]
        diffs = (_metric_from_predictions(labels[idx], a.argmax(1)[idx], c, metric)
                 - _metric_from_predictions(labels[idx], b.argmax(1)[idx], c, metric))
    diffs = diffs[~np.isnan(diffs)]
    mine, theirs = metric_value(a, labels, metric), metric_value(b, labels, metric)
    low, high = (np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (float("nan"), float("nan")))
    return Comparison(f"val_{metric}", mine, theirs, mine - theirs, float(low), float(high), len(labels), champion_version)


def paired_mean_difference(challenger: np.ndarray, champion: np.ndarray, metric: str, champion_version: str = "?",
                           resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> Comparison:
    """``paired_bootstrap`` for a metric that is a mean of per-image scores (a segmenter's Dice): both models'
    scores of the same resampled images each round, the interval of the difference of the means."""
    a, b = np.asarray(challenger, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"challenger {a.shape} and champion {b.shape} are not per-image scores of the same images")
    diffs = (a - b)[_resamples(len(a), resamples, seed)].mean(1)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return Comparison(metric, float(a.mean()), float(b.mean()), float(a.mean() - b.mean()), float(low), float(high), len(a), champion_version)


def other_dataset(champion_tags: Mapping[str, str], fingerprint: str) -> str | None:
    """Why a champion trained on another dataset (hence another split) cannot be compared with this model, or None."""
    if champion_tags.get("dataset_fingerprint") != fingerprint:
        return (f"it was trained on another dataset (fingerprint {str(champion_tags.get('dataset_fingerprint'))[:12]}…, "
                f"this one {fingerprint[:12]}…)")
    return None


def incompatibility(champion_tags: Mapping[str, str], class_names: list[str], fingerprint: str) -> str | None:
    """Why the champion cannot be compared with (nor replaced by) this model, or None when it can."""
    theirs = champion_tags.get("class_names")
    if theirs is None or theirs.split(",") != list(class_names):
        return f"its classes are [{theirs or 'unknown'}], this model's [{','.join(class_names)}]"
    return other_dataset(champion_tags, fingerprint)


@dataclass(frozen=True)
class Decision:
    """What the new version gets: ``champion``, ``challenger`` or no alias, and why (one line)."""

    alias: str | None
    reason: str
    gate: Gate  # a dataclass: GateResult or SegmentGateResult
    comparison: Comparison | None = None
    champion_version: str | None = None  # the champion in place before this version

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION

    def to_dict(self) -> dict:
        return {"alias": self.alias, "reason": self.reason, "gate": asdict(self.gate),
                "comparison": asdict(self.comparison) if self.comparison else None, "champion_version": self.champion_version}


def decide(gate: Gate, model_name: str, champion_version: str | None, why_incompatible: str | None,
           comparison: Comparison | None) -> Decision:
    """The promotion rule: gate first, then compatibility with the champion, then the comparison on the same split."""
    if not gate.passed:
        return Decision(None, f"not promoted: {gate.reason}", gate, None, champion_version)
    if champion_version is None:
        return Decision(CHAMPION, f"@champion: first version of {model_name} to pass the quality gate", gate, None, None)
    if why_incompatible is not None:
        return Decision(None, f"not promoted: {model_name}@champion (version {champion_version}) stays, {why_incompatible}; "
                              f"register this model under a name of its own with --model-name", gate, None, champion_version)
    assert comparison is not None
    if comparison.wins:
        return Decision(CHAMPION, f"@champion (replaces version {champion_version}): {comparison.line()}", gate, comparison, champion_version)
    return Decision(CHALLENGER, f"@challenger, champion version {champion_version} kept: {comparison.line()}", gate, comparison, champion_version)


def champion_version(model_name: str):
    """The registry's ``@champion`` of ``model_name`` (an MLflow ``ModelVersion``), or None when there is none yet."""
    import mlflow
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no such model, or no such alias
        return None


def judge(model_name: str, probs: np.ndarray, labels: np.ndarray, index: np.ndarray, class_names: list[str], fingerprint: str,
          metric: str, dataset, train_counts: list[int] | None = None, log=print) -> Decision:
    """The decision for a model scored as ``probs`` on ``dataset``'s validation split (rows ``index``), before it is registered.

    A compatible champion is loaded from the registry (its own weights, temperature and preprocessing)
    and scored on the same split here; an incompatible one is left in place, untouched."""
    gate = quality_gate(probs, labels, class_names, train_counts)
    current = champion_version(model_name)
    if current is None:
        return decide(gate, model_name, None, None, None)
    why = incompatibility(current.tags, class_names, fingerprint)
    comparison = None
    if gate.passed and why is None:
        from pipelines.serve.calibration import apply_temperature
        from pipelines.serve.evaluate import split_probabilities
        from pipelines.serve.loading import load

        try:
            loaded = load(f"models:/{model_name}/{current.version}")
            raw, _, champion_index = split_probabilities(loaded.model, dataset, "val")
        except Exception as e:  # noqa: BLE001 - a champion that cannot be scored must not lose this run's model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return Decision(None, f"not promoted: {model_name}@champion (version {current.version}) could not be loaded and scored "
                                     f"on this split ({first}); compare the two by hand with `msmae evaluate`", gate, None, str(current.version))
        row_of = {int(i): k for k, i in enumerate(champion_index)}  # Ray Data's order may differ between two passes
        missing = [int(i) for i in index if int(i) not in row_of]
        if missing or len(champion_index) != len(index):  # same fingerprint, so never expected: refuse rather than guess
            return Decision(None, f"not promoted: {model_name}@champion (version {current.version}) was scored on other images "
                                  f"than this model ({len(missing)} missing, {len(champion_index)} vs {len(index)}); not compared",
                            gate, None, str(current.version))
        champion_probs = apply_temperature(raw.numpy(), loaded.temperature)[[row_of[int(i)] for i in index]]
        comparison = paired_bootstrap(probs, champion_probs, labels, metric, str(current.version))
        log(f"champion comparison: {comparison.line()}")
    return decide(gate, model_name, str(current.version), why, comparison)
