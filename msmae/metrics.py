"""Classification metrics for imbalanced medical data, in plain torch.

Accuracy alone flatters a model that always predicts the majority class (HAM10000 is
two-thirds ``nv``), so balanced accuracy, macro-F1 and per-class ROC AUC come with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def roc_auc_ovr(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-vs-rest ROC AUC per class, ``[C]``; NaN for a class with no positives or no negatives.

    Mann-Whitney form: AUC = (rank-sum of positives − n⁺(n⁺+1)/2) / (n⁺ n⁻), with tied
    scores given their average rank, which equals the trapezoidal ROC area.
    """
    aucs = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    for c in range(num_classes):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(probs[:, c].double())
        aucs[c] = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return aucs


def _average_ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties sharing their mean rank."""
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of ranks start..end of each tie run
    ranks = torch.empty_like(scores)
    ranks[order] = mean_rank[inverse]
    return ranks


# The headline metrics, each with its printed name: every one is logged per epoch, printed in the
# final table, and selectable as ``checkpoint.metric`` / a sweep's objective (as ``val_<name>``).
# A new metric is a field of ClassificationReport, its value in classification_report, and a line here.
HEADLINE_METRICS: dict[str, str] = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "macro_auc": "macro ROC AUC",
}


@dataclass
class ClassificationReport:
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    macro_auc: float
    per_class_auc: list[float]
    confusion: list[list[int]]
    num_samples: int
    loss: float = float("nan")
    extra: dict[str, float] = field(default_factory=dict)

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Flat scalar metrics (for logging); per-class AUC under ``auc_<class index>``."""
        out = {
            **{name: getattr(self, name) for name in HEADLINE_METRICS},
            "loss": self.loss,
            **{f"auc_{i}": a for i, a in enumerate(self.per_class_auc)},
            **self.extra,
        }
        return {f"{prefix}{k}": v for k, v in out.items()}


def classification_report(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int, loss: float = float("nan")
) -> ClassificationReport:
    """All metrics from predicted probabilities ``[N, C]`` and true labels ``[N]``.

    Balanced accuracy and macro-F1 average over the classes present in ``labels``
    (absent classes would otherwise count as 0 and punish a correct model).
    """
    if probs.ndim != 2 or probs.shape[1] != num_classes or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"need probs [N, {num_classes}] and labels [N], got {tuple(probs.shape)}, {tuple(labels.shape)}")
    probs, labels = probs.detach().cpu().double(), labels.detach().cpu().long()
    cm = confusion_matrix(labels, probs.argmax(dim=1), num_classes).double()
    support, predicted, correct = cm.sum(1), cm.sum(0), cm.diag()
    present = support > 0
    recall = correct / support.clamp_min(1)
    precision = correct / predicted.clamp_min(1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(recall))
    aucs = roc_auc_ovr(probs, labels, num_classes)
    n = int(labels.numel())
    valid_auc = aucs[~torch.isnan(aucs)]
    return ClassificationReport(
        accuracy=float(correct.sum() / max(n, 1)),
        balanced_accuracy=float(recall[present].mean()) if present.any() else math.nan,
        macro_f1=float(f1[present].mean()) if present.any() else math.nan,
        macro_auc=float(valid_auc.mean()) if valid_auc.numel() else math.nan,
        per_class_auc=[float(a) for a in aucs],
        confusion=cm.long().tolist(),
        num_samples=n,
        loss=loss,
    )
