"""Health warnings: what in a finished run's own numbers says the model is probably not what it seems.

Why: a run can end with a registered model while its pre-training classifier sat at chance for
half the epochs, or while the attention maps that drive the masking put their weight on the
background; nothing failed, so nothing said so. These checks read the per-epoch metrics the run
logged (``(epoch, value)`` histories), the training split's class counts and the calibration
outcome, and return one line per problem, for the end-of-run summary and the run's tags.
Pure functions: no MLflow, no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

History = Sequence[tuple[int, float]]  # (epoch, value), as MLflow's metric history gives them

CHANCE_MARGIN = 0.05  # balanced accuracy within this of 1/C counts as chance
CHANCE_EPOCHS = 5  # ... for at least this many consecutive epochs
LIFT_FLOOR = 1.0  # a map lift below 1: more of the map's mass on background than the background's share of patches
IMBALANCE_RATIO = 3.0  # largest / smallest class in the training split


@dataclass(frozen=True)
class HealthWarning:
    code: str  # stable, for tags and tests: classifier_at_chance, low_map_lift, calibration_not_applied, class_imbalance
    message: str  # one line, with what to do


def _clean(history: History) -> list[tuple[int, float]]:
    return sorted((int(s), float(v)) for s, v in history if v is not None and not math.isnan(float(v)))


def classifier_at_chance(history: History, num_classes: int, stage: str = "pre-training",
                         margin: float = CHANCE_MARGIN, min_epochs: int = CHANCE_EPOCHS) -> HealthWarning | None:
    """The longest run of consecutive epochs whose validation balanced accuracy is within ``margin`` of 1/C."""
    chance = 1.0 / num_classes
    best: tuple[int, int] | None = None  # (first epoch, last epoch) of the longest streak
    start = prev = None
    for epoch, value in _clean(history):
        at_chance = abs(value - chance) <= margin
        if at_chance and start is not None and prev == epoch - 1:
            prev = epoch
        elif at_chance:
            start = prev = epoch
        else:
            start = prev = None
        if start is not None and (best is None or prev - start > best[1] - best[0]):
            best = (start, prev)
    if best is None or best[1] - best[0] + 1 < min_epochs:
        return None
    first, last = best[0] + 1, best[1] + 1  # printed 1-based, as the progress lines count epochs
    return HealthWarning("classifier_at_chance",
                         f"{stage} CLS classifier at chance (validation balanced accuracy within {margin:.2f} of 1/{num_classes} = "
                         f"{chance:.2f}) for {last - first + 1} consecutive epochs ({first}-{last}): its signal guides the maps; "
                         "try a higher pretrain.cls_weight or blr, or more epochs")


def low_map_lift(history: History, floor: float = LIFT_FLOOR) -> HealthWarning | None:
    """The attention maps at the last refresh put less of their mass on tissue than tissue's share of the patches."""
    points = _clean(history)
    if not points:
        return None
    epoch, lift = points[-1]
    if lift >= floor:
        return None
    return HealthWarning("low_map_lift",
                         f"attention maps' lift on tissue {lift:.2f} at the last refresh (epoch {epoch + 1}; below {floor:.0f}: "
                         "more weight on background than on tissue), so attention masking hides background, not anatomy; "
                         "check plots/attention_overlays.png, or use pretrain.masking.strategy=random")


def calibration_not_applied(applied: bool, ece_before: float, ece_fitted: float, temperature: float) -> HealthWarning | None:
    if applied:
        return None
    return HealthWarning("calibration_not_applied",
                         f"temperature scaling did not help (fitted T = {temperature:.3f}: validation ECE {ece_before:.4f} -> "
                         f"{ece_fitted:.4f}); the model keeps T = 1, its probabilities uncalibrated")


def class_imbalance(counts: Sequence[int], class_names: Sequence[str], weight_rules: Mapping[str, str],
                    ratio: float = IMBALANCE_RATIO) -> HealthWarning | None:
    """Largest / smallest training class at or above ``ratio``; suggests balanced class weights where a stage has none.

    ``weight_rules``: the ``class_weights`` of each stage that ran (``{"finetune": "none"}``)."""
    if len(counts) < 2 or max(counts) <= 0:
        return None
    big, small = max(range(len(counts)), key=counts.__getitem__), min(range(len(counts)), key=counts.__getitem__)
    seen = counts[big] / max(counts[small], 1)
    if seen < ratio:
        return None
    unweighted = [stage for stage, rule in weight_rules.items() if rule != "balanced"]
    hint = (" ".join(f"--set {stage}.class_weights=balanced" for stage in unweighted) + " weighs the loss against it") \
        if unweighted else "class_weights: balanced is already on; judge the model by balanced accuracy and per-class AUC"
    return HealthWarning("class_imbalance",
                         f"heavy class imbalance in the training split ({class_names[big]} {counts[big]} vs {class_names[small]} "
                         f"{counts[small]}, {seen:.1f}x): {hint}")


def run_health(histories: Mapping[str, History], num_classes: int, train_counts: Sequence[int], class_names: Sequence[str],
               weight_rules: Mapping[str, str], calibration: tuple[bool, float, float, float] | None = None) -> list[HealthWarning]:
    """Every check on one run. ``histories``: MLflow keys (``pretrain/val_balanced_accuracy``,
    ``pretrain/map_foreground_lift``, ``finetune/map_foreground_lift``) to their histories; ``calibration``:
    ``(applied, ece_before, ece_fitted, fitted_temperature)`` when the run fine-tuned."""
    found = [
        classifier_at_chance(histories.get("pretrain/val_balanced_accuracy", ()), num_classes),
        low_map_lift(histories.get("pretrain/map_foreground_lift", ()) or histories.get("finetune/map_foreground_lift", ())),
        calibration_not_applied(*calibration) if calibration is not None else None,
        class_imbalance(train_counts, class_names, weight_rules),
    ]
    return [w for w in found if w is not None]


HEALTH_KEYS = ("pretrain/val_balanced_accuracy", "pretrain/map_foreground_lift", "finetune/map_foreground_lift")
