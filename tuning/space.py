"""Search spaces for `msmae tune`, read from YAML (``configs/space-masking.yaml``).

Mask and throw ratios are never sampled directly: a trial draws the *visible* fraction v and
the share s of the hidden patches that are masked (reconstructed) rather than thrown, then

    mask_ratio = (1 - v) * s,   throw_ratio = (1 - v) * (1 - s)

so ``mask + throw = 1 - v <= 1 - v_min`` holds by construction and no trial can crash on it
(sampling m and t independently wastes trials on invalid pairs, or breaks TPE with
rejections). Everything else is a plain dotted config key with a distribution.

Format::

    objective: val_macro_f1          # a validation metric the training loop reports, maximised;
                                     # val_dice / val_iou: each trial pre-trains, then trains a segmenter
                                     # (`msmae segment`) from it; the segmenter's Dice / IoU is the objective
    scheduler: {grace_period: 4, reduction_factor: 2}   # ASHA, in fine-tuning epochs
    masking:
      pretrain: {visible: [0.15, 0.45], masked_share: [0.3, 0.9]}
      finetune: {visible: [0.15, 0.60], masked_share: [0.3, 0.9]}
    params:
      pretrain.masking.sam_start: {int: [2, 8]}
      pretrain.cls_weight: {log: [0.02, 0.5]}
      finetune.masking.strategy: {choice: [attention, uniform, all]}
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.config import SEGMENT_METRICS, SELECTION_METRICS, ConfigError, RunConfig, load_yaml

DISTRIBUTIONS = ("float", "log", "int", "choice")
STAGES = ("pretrain", "finetune")


class SpaceError(ValueError):
    """The search space file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key, e.g. pretrain.cls_weight
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) or the choices

    def suggest(self, trial) -> Any:
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, int(low), int(high))
        return trial.suggest_float(self.key, float(low), float(high), log=self.kind == "log")


@dataclass(frozen=True)
class MaskingRange:
    """Visible fraction and masked share ranges for one stage's SAM ratios."""

    stage: str
    visible: tuple[float, float]
    masked_share: tuple[float, float]

    def suggest(self, trial) -> dict[str, float]:
        visible = trial.suggest_float(f"{self.stage}.masking.visible", *self.visible)
        share = trial.suggest_float(f"{self.stage}.masking.masked_share", *self.masked_share)
        return ratios_from(visible, share, self.stage)


def _suggest_all(space: "SearchSpace", trial) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for masking in space.masking:
        overrides.update(masking.suggest(trial))
    for param in space.params:
        overrides[param.key] = param.suggest(trial)
    return overrides


def ratios_from(visible: float, masked_share: float, stage: str) -> dict[str, float]:
    hidden = 1.0 - visible
    return {f"{stage}.masking.mask_ratio": hidden * masked_share, f"{stage}.masking.throw_ratio": hidden * (1.0 - masked_share)}


@dataclass(frozen=True)
class SearchSpace:
    objective: str = "val_macro_f1"
    grace_period: int = 4
    reduction_factor: int = 2
    masking: tuple[MaskingRange, ...] = ()
    params: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def task(self) -> str:
        """``segmentation`` when the objective is a segmenter's (trials pre-train, then segment), else ``classification``."""
        return "segmentation" if self.objective in SEGMENT_METRICS else "classification"

    def define_by_run(self) -> Callable:
        """The Optuna define-by-run function: suggests every parameter, returns the config overrides.

        A partial of a module-level function, because Tune pickles the searcher into its
        experiment checkpoint (a closure would not pickle, and the sweep could not resume).
        """
        return functools.partial(_suggest_all, self)

    def corners(self) -> list[dict[str, Any]]:
        """Overrides at the extremes of every range (low ends, high ends), each with every combination
        of the choices, for up-front validation: whether a ratio matters can depend on a choice (the
        fine-tuning ratios only when fine-tuning drops tokens)."""
        choices = [p for p in self.params if p.kind == "choice"]
        out = []
        for pick in (0, -1):
            overrides: dict[str, Any] = {}
            for m in self.masking:
                overrides.update(ratios_from(m.visible[pick], m.masked_share[-1 - pick], m.stage))
            for p in self.params:
                if p.kind != "choice":
                    overrides[p.key] = p.values[pick]
            for combination in itertools.product(*(p.values for p in choices)):
                out.append({**overrides, **{p.key: v for p, v in zip(choices, combination)}})
        return out


SAMPLING_ONLY = (".masking.visible", ".masking.masked_share")


def run_overrides(trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``{dotted key: value}`` for ``RunConfig.with_values``: Tune hands over the sampled visible fraction and
    masked share too, which are not config keys (the ratios derived from them are)."""
    return {k: v for k, v in trial_config.items() if not k.endswith(SAMPLING_ONLY)}


TOP_LEVEL = ("objective", "scheduler", "masking", "params")
SCHEDULER_KEYS = ("grace_period", "reduction_factor")
MASKING_KEYS = ("visible", "masked_share")


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file: every entry's shape and range, before any trial (or Ray) starts."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist (the everyday one is configs/space-masking.yaml)")
    try:
        tree = load_yaml(path) or {}  # the config's reader: a key given twice is refused, not silently the last
    except ConfigError as e:
        raise SpaceError(" ".join(str(e).split())) from None
    _mapping(path, "", tree, TOP_LEVEL)
    objective = tree.get("objective", "val_macro_f1")
    if objective not in SELECTION_METRICS + SEGMENT_METRICS:  # what a run selects its model on, so what a sweep can maximise
        raise SpaceError(f"{path}: objective: {objective!r} is not a validation metric a run reports; choose one of "
                         f"{', '.join(SELECTION_METRICS + SEGMENT_METRICS)}")
    scheduler = _mapping(path, "scheduler", tree.get("scheduler") or {}, SCHEDULER_KEYS)
    grace_period = _integer(path, "scheduler.grace_period", scheduler.get("grace_period", 4), minimum=1)
    reduction_factor = _integer(path, "scheduler.reduction_factor", scheduler.get("reduction_factor", 2), minimum=2)
    masking = []
    for stage, spec in _mapping(path, "masking", tree.get("masking") or {}, STAGES).items():
        spec = _mapping(path, f"masking.{stage}", spec, MASKING_KEYS, required=True)
        visible = _range(path, f"masking.{stage}.visible", spec["visible"], 0.0, 1.0)
        share = _range(path, f"masking.{stage}.masked_share", spec["masked_share"], 0.0, 1.0)
        if visible[0] <= 0.03 or share[0] <= 0:
            raise SpaceError(f"{path}: masking.{stage}: visible must stay > 0.03 and masked_share > 0 (some patches must be seen and some reconstructed)")
        masking.append(MaskingRange(stage, visible, share))
    params = []
    derived = {k for m in masking for k in ratios_from(0.5, 0.5, m.stage)}
    for key, spec in _mapping(path, "params", tree.get("params") or {}).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: params.{key}: expected one of {{float|log|int: [low, high]}} or {{choice: [...]}}, got {spec!r}")
        if key in derived:
            raise SpaceError(f"{path}: params.{key}: already set by masking.{key.split('.')[0]} (visible, masked_share); sweep it in one place")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise SpaceError(f"{path}: params.{key}: choice needs a non-empty list, got {values!r}")
            params.append(Param(key, kind, tuple(values)))
            continue
        low, high = _range(path, f"params.{key}", values, -math.inf, math.inf, positive=kind == "log")
        if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise SpaceError(f"{path}: params.{key}: int needs whole-number bounds, got {values!r}")
        params.append(Param(key, kind, (int(low), int(high)) if kind == "int" else (low, high)))
    return SearchSpace(objective, grace_period, reduction_factor, tuple(masking), tuple(params))


def _mapping(path: Path, key: str, value: Any, allowed: tuple[str, ...] | None = None, required: bool = False) -> dict:
    """``value`` as a mapping whose keys are ``allowed`` (all of them when ``required``), or a SpaceError naming ``key``
    (``""``: the top level)."""
    if not isinstance(value, dict):
        shape = f" with keys {', '.join(allowed)}" if allowed else ""
        raise SpaceError(f"{path}: {key or 'the top level'}: expected a mapping{shape}, got {value!r}")
    if allowed is not None:
        unknown = sorted(str(k) for k in set(value) - set(allowed))
        if unknown and not key:
            raise SpaceError(f"{path}: unknown top-level keys {unknown}; allowed: {', '.join(allowed)}")
        if unknown:
            raise SpaceError(f"{path}: {key}.{unknown[0]}: unknown key; allowed: {', '.join(allowed)}")
        missing = [k for k in allowed if k not in value] if required else []
        if missing:
            raise SpaceError(f"{path}: {key}: missing {', '.join(missing)}")
    return value


def _range(path: Path, key: str, values, low_bound: float, high_bound: float, positive: bool = False) -> tuple[float, float]:
    if not (isinstance(values, list | tuple) and len(values) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)):
        raise SpaceError(f"{path}: {key}: expected [low, high], got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low_bound <= low <= high <= high_bound or (positive and low <= 0):
        raise SpaceError(f"{path}: {key}: need {low_bound} <= low <= high <= {high_bound}{' and low > 0' if positive else ''}, got [{low}, {high}]")
    return low, high


def _integer(path: Path, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpaceError(f"{path}: {key}: expected a whole number >= {minimum}, got {value!r}")
    return value


def check_space(space: SearchSpace, base: RunConfig) -> RunConfig:
    """Reject a space whose keys or extremes the run configuration refuses, before any trial starts.

    The corners are the extremes of every range (low ends with the highest masked share, high
    ends with the lowest), which is where a trial would mask no patch or leave none visible;
    ``RunConfig`` itself checks those counts against the model's patch grid.
    """
    for corner in space.corners():
        _check_values(base, corner)
    for param in space.params:  # every choice, not only the first and last
        if param.kind == "choice":
            for value in param.values:
                _check_values(base, {param.key: value})
    return base


def _check_values(base: RunConfig, values: dict[str, Any]) -> None:
    try:
        base.with_values(values, source="the search space")
    except ConfigError as e:
        raise SpaceError(f"the search space reaches a configuration that is rejected: {e}") from e
