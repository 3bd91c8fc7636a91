"""Search spaces for `msmae tune`, read from YAML (``configs/space-masking.yaml``).

Mask and throw ratios are never sampled directly: a trial draws the *visible* fraction v and
the share s of the hidden patches that are masked (reconstructed) rather than thrown, then

    mask_ratio = (1 - v) * s,   throw_ratio = (1 - v) * (1 - s)

so ``mask + throw = 1 - v <= 1 - v_min`` holds by construction and no trial can crash on it
(sampling m and t independently wastes trials on invalid pairs, or breaks TPE with
rejections). Everything else is a plain dotted config key with a distribution.

Format::

    objective: val_macro_f1          # a validation metric the training loop reports, maximised
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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, RunConfig

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

    def define_by_run(self) -> Callable:
        """The Optuna define-by-run function: suggests every parameter, returns the config overrides.

        A partial of a module-level function, because Tune pickles the searcher into its
        experiment checkpoint (a closure would not pickle, and the sweep could not resume).
        """
        return functools.partial(_suggest_all, self)

    def corners(self) -> list[dict[str, Any]]:
        """Overrides at the extremes of every range (low ends, high ends), for up-front validation."""
        out = []
        for pick in (0, -1):
            overrides: dict[str, Any] = {}
            for m in self.masking:
                overrides.update(ratios_from(m.visible[pick], m.masked_share[-1 - pick], m.stage))
            for p in self.params:
                overrides[p.key] = p.values[pick]
            out.append(overrides)
        return out


SAMPLING_ONLY = (".masking.visible", ".masking.masked_share")


def run_overrides(trial_config: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``{dotted key: value}`` for ``RunConfig.with_values``: Tune hands over the sampled visible fraction and
    masked share too, which are not config keys (the ratios derived from them are)."""
    return {k: v for k, v in trial_config.items() if not k.endswith(SAMPLING_ONLY)}


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space {path} does not exist (the everyday one is configs/space-masking.yaml)")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise SpaceError(f"{path}: expected a mapping with objective/scheduler/masking/params")
    unknown = set(tree) - {"objective", "scheduler", "masking", "params"}
    if unknown:
        raise SpaceError(f"{path}: unknown top-level keys {sorted(unknown)}")
    scheduler = tree.get("scheduler") or {}
    masking = []
    for stage, spec in (tree.get("masking") or {}).items():
        if stage not in STAGES:
            raise SpaceError(f"{path}: masking.{stage}: expected one of {STAGES}")
        visible = _range(path, f"masking.{stage}.visible", (spec or {}).get("visible"), 0.0, 1.0)
        share = _range(path, f"masking.{stage}.masked_share", (spec or {}).get("masked_share"), 0.0, 1.0)
        if visible[0] <= 0.03 or share[0] <= 0:
            raise SpaceError(f"{path}: masking.{stage}: visible must stay > 0.03 and masked_share > 0 (some patches must be seen and some reconstructed)")
        masking.append(MaskingRange(stage, visible, share))
    params = []
    for key, spec in (tree.get("params") or {}).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise SpaceError(f"{path}: params.{key}: expected one of {{float|log|int: [low, high]}} or {{choice: [...]}}")
        kind, values = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise SpaceError(f"{path}: params.{key}: choice needs a non-empty list")
            params.append(Param(key, kind, tuple(values)))
        else:
            params.append(Param(key, kind, _range(path, f"params.{key}", values, -math.inf, math.inf, positive=kind == "log")))
    return SearchSpace(
        objective=str(tree.get("objective", "val_macro_f1")),
        grace_period=int(scheduler.get("grace_period", 4)),
        reduction_factor=int(scheduler.get("reduction_factor", 2)),
        masking=tuple(masking),
        params=tuple(params),
    )


def _range(path: Path, key: str, values, low_bound: float, high_bound: float, positive: bool = False) -> tuple[float, float]:
    if not (isinstance(values, list | tuple) and len(values) == 2 and all(isinstance(v, int | float) for v in values)):
        raise SpaceError(f"{path}: {key}: expected [low, high], got {values!r}")
    low, high = float(values[0]), float(values[1])
    if not low_bound <= low <= high <= high_bound or (positive and low <= 0):
        raise SpaceError(f"{path}: {key}: need {low_bound} <= low <= high <= {high_bound}{' and low > 0' if positive else ''}, got [{low}, {high}]")
    return low, high


def check_space(space: SearchSpace, base: RunConfig) -> RunConfig:
    """Reject a space whose keys or extremes the run configuration refuses, before any trial starts.

    The corners are the extremes of every range (low ends with the highest masked share, high
    ends with the lowest), which is where a trial would mask no patch or leave none visible;
    ``RunConfig`` itself checks those counts against the model's patch grid.
    """
    for corner in space.corners():
        try:
            base.with_values(corner, source="the search space")
        except ConfigError as e:
            raise SpaceError(f"the search space reaches a configuration that is rejected: {e}") from e
    return base
