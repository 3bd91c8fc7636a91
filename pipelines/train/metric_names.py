"""Metric keys with class names instead of class indices (``val_auc_glioma``, not ``val_auc_0``), MLflow-safe.

Why a module of its own: the Ray Train workers name their per-epoch metrics with it and the end of a
run names its final ones with it, and a worker should not import the registry to do so.
"""

from __future__ import annotations

import re


def metric_safe(name: str) -> str:
    """A class name as MLflow accepts it in a metric key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def named_scalars(report, class_names: list[str], prefix: str) -> dict[str, float]:
    """A report's scalar metrics with per-class AUC under the class's name (``auc_glioma``), not its index."""
    out = report.scalars(prefix)
    for i, name in enumerate(class_names):
        out[f"{prefix}auc_{metric_safe(name)}"] = out.pop(f"{prefix}auc_{i}")
    return out
