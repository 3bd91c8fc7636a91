"""Whether a newly registered segmenter may take ``@champion``: the classifier's rule (``pipelines.serve.promotion``)
with a segmenter's quality gate and per-image scores.

Why a gate: a segmenter whose masks are no better than a trivial mask must never be what
``models:/NAME@champion`` answers with. The trivial masks are scored on the same validation images
at their own size: "everything is lesion" (Dice 2p / (1 + p) for an image whose lesion share is p)
and "nothing is lesion" (Dice 0 for an image with a lesion, 1 for one without: both masks empty, as
``dice_iou_np`` counts it). The gate passes when the 2.5 % percentile of the bootstrap mean Dice (over
images) is above the better baseline's mean Dice. Why the champion is scored here: a Dice stored with
the champion was measured on *its* run's images; the same fingerprint means the same split, so the
champion is loaded from the registry (its weights file alone, read ``weights_only``) and scored on this
run's validation images, and the per-image differences are resampled together (paired bootstrap).
The decision (``promotion.decide``) is the classifier's: gate first, then compatibility, then the
point margin on the selection metric, the 95 % CI reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from pipelines.serve import promotion
from pipelines.serve.promotion import BOOTSTRAP_RESAMPLES, GATE_MARGIN, Comparison, Decision

ALL_LESION, NO_LESION = "everything is lesion", "nothing is lesion"


def trivial_dice(lesion_share: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image Dice of the two trivial masks, from each image's true lesion share ``[N]``."""
    p = np.asarray(lesion_share, dtype=np.float64)
    return {ALL_LESION: 2 * p / (1 + p), NO_LESION: (p == 0).astype(np.float64)}


@dataclass(frozen=True)
class SegmentGateResult:
    """The segmenter's quality gate on one split: the model's mean Dice and its bootstrap 95 % lower bound
    against the better of the two trivial masks."""

    passed: bool
    reason: str  # one line
    dice: float
    dice_lower: float  # bootstrap 2.5 % percentile of the mean over images
    baseline: str  # the better trivial mask
    baseline_dice: float
    all_lesion_dice: float
    no_lesion_dice: float
    images: int
    split: str

    def tags(self) -> dict[str, str]:
        return {"quality_gate": "passed" if self.passed else "failed", "quality_gate.dice_lower": f"{self.dice_lower:.6f}",
                "quality_gate.baseline": self.baseline, "quality_gate.baseline_dice": f"{self.baseline_dice:.6f}"}


def quality_gate(dice: np.ndarray, lesion_share: np.ndarray, split: str = "val", margin: float = GATE_MARGIN,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> SegmentGateResult:
    """Pass only when the model's mean Dice beats, with 95 % confidence, both trivial masks' mean Dice on the same images."""
    dice, share = np.asarray(dice, dtype=np.float64), np.asarray(lesion_share, dtype=np.float64)
    if dice.shape != share.shape:
        raise ValueError(f"{dice.shape} Dice values but {share.shape} lesion shares: not the same images")
    n = len(dice)
    if n == 0:
        nan = float("nan")
        return SegmentGateResult(False, f"quality gate failed: no {split} images with a mask to judge the model on", nan, nan, "", nan, nan, nan, 0, split)
    means = {name: float(values.mean()) for name, values in trivial_dice(share).items()}
    baseline = max(means, key=means.get)
    mean, lower = float(dice.mean()), promotion.bootstrap_mean_lower(dice, resamples, seed)
    passed = lower > means[baseline] + margin
    verdict = "passed" if passed else "failed"
    relation = ">" if passed else "does not clear"
    reason = (f"quality gate {verdict} on {n} {split} images: Dice {mean:.3f} (95% lower bound {lower:.3f}) {relation} the trivial "
              f"mask '{baseline}' {means[baseline]:.3f} ('{ALL_LESION}' {means[ALL_LESION]:.3f}, '{NO_LESION}' {means[NO_LESION]:.3f})")
    return SegmentGateResult(passed, reason, mean, lower, baseline, means[baseline], means[ALL_LESION], means[NO_LESION], n, split)


def incompatibility(champion_tags: Mapping[str, str], fingerprint: str) -> str | None:
    """Why the champion cannot be compared with (nor replaced by) this segmenter, or None when it can."""
    if champion_tags.get("task") != "segmentation":
        return f"it is not a segmenter (task {champion_tags.get('task') or 'unknown'})"
    return promotion.other_dataset(champion_tags, fingerprint)


def aligned(challenger_index: np.ndarray, champion_index: np.ndarray) -> np.ndarray | None:
    """Positions in the champion's scores of each of the challenger's images, or None when they are not the same images."""
    row_of = {int(i): k for k, i in enumerate(champion_index)}
    if len(champion_index) != len(challenger_index) or any(int(i) not in row_of for i in challenger_index):
        return None
    return np.asarray([row_of[int(i)] for i in challenger_index], dtype=np.int64)


def judge(model_name: str, val, dataset, fingerprint: str, metric: str = "val_dice", log: Callable[[str], None] = print) -> Decision:
    """The decision for a segmenter scored as ``val`` (a ``segment_evaluate.MaskReport`` of ``dataset``'s validation
    split), before it is registered. A compatible champion is loaded from the registry and scored on the same split
    here; an incompatible one is left in place, untouched."""
    gate = quality_gate(val.dice, val.lesion_share, val.split)
    current = promotion.champion_version(model_name)
    if current is None:
        return promotion.decide(gate, model_name, None, None, None)
    why = incompatibility(current.tags or {}, fingerprint)
    comparison = None
    if gate.passed and why is None:
        from pipelines.serve.segment_evaluate import evaluate_masks
        from pipelines.serve.segment_registry import registered_predictor

        try:
            theirs = evaluate_masks(registered_predictor(model_name, str(current.version)), dataset, val.split)
        except Exception as e:  # noqa: BLE001 - a champion that cannot be scored must not lose this run's model
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            return Decision(None, f"not promoted: {model_name}@champion (version {current.version}) could not be loaded and scored "
                                  f"on this split ({first}); compare the two by hand", gate, None, str(current.version))
        rows = aligned(val.index, theirs.index)
        if rows is None:  # same fingerprint, so never expected: refuse rather than guess
            return Decision(None, f"not promoted: {model_name}@champion (version {current.version}) was scored on other images "
                                  f"than this model ({len(theirs.index)} vs {len(val.index)}); not compared", gate, None, str(current.version))
        name = metric.removeprefix("val_")
        comparison = promotion.paired_mean_difference(getattr(val, name), getattr(theirs, name)[rows], f"val_{name}", str(current.version))
        log(f"champion comparison: {comparison.line()}")
    return promotion.decide(gate, model_name, str(current.version), why, comparison)


def comparison_tags(comparison: Comparison | None) -> dict[str, str]:
    """The margin over the champion and its paired-bootstrap CI as version tags (none when not compared)."""
    if comparison is None:
        return {}
    return {"champion_comparison.metric": comparison.metric, "champion_comparison.champion_version": comparison.champion_version,
            "champion_comparison.margin": f"{comparison.margin:+.6f}", "champion_comparison.ci_low": f"{comparison.ci_low:+.6f}",
            "champion_comparison.ci_high": f"{comparison.ci_high:+.6f}", "champion_comparison.images": str(comparison.images)}


def decision_tags(decision: Decision) -> dict[str, str]:
    """Every version tag the decision sets: ``promotion`` (its one line), the gate's verdict and numbers, the comparison."""
    gate = decision.gate
    assert isinstance(gate, SegmentGateResult), "a segmenter's decision carries the segmenter's gate"
    return {"promotion": decision.reason[:5000], **gate.tags(), **comparison_tags(decision.comparison)}


def card_lines(decision: Decision) -> list[str]:
    """The model card's "Promotion" section."""
    lines = ["## Promotion", decision.reason, "", f"- {decision.gate.reason}"]
    c = decision.comparison
    if c is not None:
        lines.append(c.card_line())
    return lines + [""]
