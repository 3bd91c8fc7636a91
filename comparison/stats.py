"""Is one method better than another on the same test images? Paired statistics over seeds.

Each run saves its selected model's prediction for every test image (``run_method``'s
``predictions``). Two methods run with the same seeds on the same test split are compared
image by image:

* ``paired_bootstrap`` — a 95 % interval for the difference in macro-F1 (A − B), the mean over
  seeds of the per-seed difference. Each replicate draws the test images with replacement
  once and scores every seed's pair of runs on that same draw (images are paired within and
  across seeds), so the interval reflects which images happened to be in the test split;
  the seed-to-seed spread enters through the mean.
* ``mcnemar`` — McNemar's test on the discordant images pooled over seeds (b: A right and B
  wrong, c: the reverse): the exact two-sided binomial p-value and the mid-p (exact minus
  the probability of the observed count, which is less conservative and keeps close to the
  nominal level). Pooling seeds counts an image once per seed, so with several seeds p is
  somewhat optimistic; the bootstrap interval is the headline.

numpy only (scipy's binomial test where it is installed gives the same exact p).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def macro_f1(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Macro-F1 over the classes present in ``label`` (as ``msmae.classification_report``)."""
    return float(_macro_f1_batch(np.asarray(pred)[None], np.asarray(label)[None], num_classes)[0])


def _macro_f1_batch(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """Macro-F1 of each row of ``pred`` / ``label`` ``[R, N]`` (classes present in that row's labels)."""
    rows = pred.shape[0]
    offset = (np.arange(rows) * num_classes * num_classes)[:, None]
    cm = np.bincount((offset + label * num_classes + pred).ravel(), minlength=rows * num_classes * num_classes)
    cm = cm.reshape(rows, num_classes, num_classes).astype(np.float64)
    support, predicted, correct = cm.sum(2), cm.sum(1), np.diagonal(cm, axis1=1, axis2=2)
    recall = correct / np.maximum(support, 1)
    precision = correct / np.maximum(predicted, 1)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    present = support > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


@dataclass(frozen=True)
class PairedDifference:
    """A − B in macro-F1 (mean over seeds) with its bootstrap interval."""

    diff: float
    low: float
    high: float
    seeds: int
    images: int
    replicates: int

    def __str__(self) -> str:
        return f"{self.diff:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _check_pairs(preds_a: Sequence[Sequence[int]], preds_b: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> None:
    if not preds_a or not (len(preds_a) == len(preds_b) == len(labels)):
        raise ValueError(f"need one prediction list per seed for both methods and the labels: "
                         f"{len(preds_a)}, {len(preds_b)}, {len(labels)}")
    sizes = {len(x) for x in [*preds_a, *preds_b, *labels]}
    if len(sizes) != 1:
        raise ValueError(f"every seed's predictions must cover the same test images; lengths {sorted(sizes)}")


def paired_bootstrap(
    preds_a: Sequence[Sequence[int]], preds_b: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], num_classes: int,
    replicates: int = 2000, confidence: float = 0.95, seed: int = 0,
) -> PairedDifference:
    """Percentile bootstrap of mean-over-seeds macro-F1(A) − macro-F1(B) (see the module doc).

    ``preds_a[s]``, ``preds_b[s]``, ``labels[s]``: predicted and true classes of seed s's
    runs, over the same test images in the same order.
    """
    _check_pairs(preds_a, preds_b, labels)
    a, b, y = (np.asarray(x, dtype=np.int64) for x in (preds_a, preds_b, labels))
    seeds, n = y.shape
    point = float(np.mean(_macro_f1_batch(a, y, num_classes) - _macro_f1_batch(b, y, num_classes)))
    rng = np.random.default_rng(seed)
    diffs = np.empty(replicates)
    chunk = max(1, 2_000_000 // max(n * seeds, 1))
    for start in range(0, replicates, chunk):
        stop = min(start + chunk, replicates)
        draw = rng.integers(0, n, size=(stop - start, n))  # one draw of images per replicate, shared by all seeds
        ra = a[:, draw].transpose(1, 0, 2).reshape(-1, n)
        rb = b[:, draw].transpose(1, 0, 2).reshape(-1, n)
        ry = y[:, draw].transpose(1, 0, 2).reshape(-1, n)
        per = _macro_f1_batch(ra, ry, num_classes) - _macro_f1_batch(rb, ry, num_classes)
        diffs[start:stop] = per.reshape(stop - start, seeds).mean(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return PairedDifference(point, float(low), float(high), seeds, n, replicates)


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs pooled over seeds and the test's p-values."""

    b: int  # A right, B wrong
    c: int  # A wrong, B right
    p_exact: float
    p_mid: float


def binom_two_sided(k: int, n: int) -> tuple[float, float]:
    """Exact two-sided p and mid-p of ``k`` successes in ``n`` fair trials (McNemar's exact test)."""
    if n == 0:
        return 1.0, 1.0
    k = min(k, n - k)
    log_pmf = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    cdf = sum(math.exp(v) for v in log_pmf)
    if 2 * k == n:  # as balanced as can be: both tails cover everything
        return 1.0, 1.0
    return min(1.0, 2 * cdf), 2 * cdf - math.exp(log_pmf[k])  # mid-p: half the observed count's probability per tail


def mcnemar(preds_a: Sequence[Sequence[int]], preds_b: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]) -> McNemar:
    """McNemar's exact and mid-p test on the discordant images of all seeds (see the module doc)."""
    _check_pairs(preds_a, preds_b, labels)
    a, b, y = (np.asarray(x, dtype=np.int64) for x in (preds_a, preds_b, labels))
    right_a, right_b = a == y, b == y
    only_a, only_b = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    exact, mid = binom_two_sided(only_a, only_a + only_b)
    return McNemar(only_a, only_b, exact, mid)
