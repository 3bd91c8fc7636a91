"""comparison.stats: macro-F1 as the runner computes it, McNemar's exact / mid-p test against
hand-computed binomial values, and the paired bootstrap interval's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comparison.stats import binom_two_sided, macro_f1, mcnemar, paired_bootstrap
from msmae import classification_report


def test_macro_f1_matches_the_runners_report_including_absent_classes():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, 300)  # class 3 never occurs: averaged over the 3 present classes, as the report does
    pred = np.where(rng.random(300) < 0.6, label, rng.integers(0, 4, 300))
    report = classification_report(torch.nn.functional.one_hot(torch.as_tensor(pred), 4).float(), torch.as_tensor(label), 4)
    assert macro_f1(pred, label, 4) == pytest.approx(report.macro_f1, abs=1e-12)
    assert macro_f1(label, label, 4) == 1.0


@pytest.mark.parametrize("k,n,exact,mid", [
    (1, 10, 22 / 1024, 12 / 1024),  # 2·(1 + 10)/2^10; mid-p: minus P(X = 1) = 10/2^10
    (0, 5, 2 / 32, 1 / 32),
    (3, 20, 2 * 1351 / 2**20, (2 * 1351 - 1140) / 2**20),  # P(X <= 3) = (1 + 20 + 190 + 1140) / 2^20
    (5, 10, 1.0, 1.0),
    (9, 10, 22 / 1024, 12 / 1024),  # symmetric in b and c
    (0, 0, 1.0, 1.0),  # no discordant image: nothing to test
])
def test_binomial_p_values_are_the_exact_ones(k, n, exact, mid):
    assert binom_two_sided(k, n) == pytest.approx((exact, mid), rel=1e-12)


def test_mcnemar_counts_discordant_images_over_seeds():
    label = [[0, 1, 2, 0, 1]] * 2
    a = [[0, 1, 2, 0, 0], [0, 1, 2, 1, 1]]  # seed 0: wrong on image 4; seed 1: wrong on image 3
    b = [[0, 0, 0, 0, 1], [1, 1, 2, 0, 1]]  # seed 0: wrong on 1, 2; seed 1: wrong on 0
    result = mcnemar(a, b, label)
    assert (result.b, result.c) == (3, 2)  # A right & B wrong: 1, 2 (s0), 0 (s1); the reverse: 4 (s0), 3 (s1)
    assert (result.p_exact, result.p_mid) == pytest.approx(binom_two_sided(2, 5))
    with pytest.raises(ValueError, match="same test images"):
        mcnemar([[0, 1]], [[0]], [[0, 1]])


def test_bootstrap_interval_covers_the_difference_and_shrinks_with_more_images():
    rng = np.random.default_rng(1)

    def runs(n: int, accuracy: float, seeds: int = 3):
        label = rng.integers(0, 4, n)
        preds = [np.where(rng.random(n) < accuracy, label, rng.integers(0, 4, n)) for _ in range(seeds)]
        return preds, [label] * seeds

    good, labels = runs(400, 0.9)
    bad = [np.where(rng.random(400) < 0.5, labels[0], rng.integers(0, 4, 400)) for _ in range(3)]
    result = paired_bootstrap(good, bad, labels, 4, replicates=1000)
    expected = np.mean([macro_f1(g, labels[0], 4) - macro_f1(b, labels[0], 4) for g, b in zip(good, bad)])
    assert result.diff == pytest.approx(expected)
    assert 0 < result.low < result.diff < result.high  # a clear win: the interval excludes 0
    same = paired_bootstrap(good, good, labels, 4, replicates=200)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    # another method as accurate as the first: the interval straddles 0
    twin = [np.where(rng.random(400) < 0.9, labels[0], rng.integers(0, 4, 400)) for _ in range(3)]
    close = paired_bootstrap(good, twin, labels, 4, replicates=1000)
    assert close.low < 0 < close.high
    small = paired_bootstrap([g[:100] for g in good], [b[:100] for b in bad], [y[:100] for y in labels], 4, replicates=1000)
    assert (small.high - small.low) > (result.high - result.low)
    assert str(result).startswith(f"{result.diff:+.3f} [")
