"""Calibration: expected calibration error, and temperature scaling fitted on validation.

Why: a clinician's threshold on ``prob_<class>`` only means something if, among images given
0.8, about 80 % are that class. Small ViTs trained with label smoothing on a few hundred images
are rarely calibrated out of the box. Temperature scaling (Guo et al., 2017) divides the logits
by one scalar T fitted to minimise the validation negative log-likelihood: it cannot change
the predicted class (accuracy, confusion matrix unchanged), only how confident the
probabilities are.

Everything here works on probabilities as ``msmae.evaluate`` returns them: ``log p`` is the
logits shifted by a per-image constant (their log-sum-exp), and softmax ignores such shifts,
so ``softmax(log p / T) == softmax(logits / T)`` (up to the 1e-12 floor on p). numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 15  # Guo et al.'s choice; equal-width confidence bins
_LOG_T_RANGE = (-3.0, 3.0)  # T between 0.05 and 20: anything outside is a broken model, not calibration


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``[N, C]`` as they would be with the logits divided by ``temperature``."""
    z = _log_probs(probs) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(-_log_probs(probs)[np.arange(len(labels)), labels].mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising validation NLL, by golden-section search over log T in [-3, 3].

    The NLL of temperature-scaled softmax is convex in 1/T, hence unimodal in log T, so a
    one-dimensional bracketing search finds it without gradients or an optimiser's tuning."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on no images")
    lo, hi = _LOG_T_RANGE
    ratio = (np.sqrt(5.0) - 1) / 2

    def loss(log_t: float) -> float:
        return nll(apply_temperature(probs, float(np.exp(log_t))), labels)

    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # the bracket shrinks by 0.618 each step: 6 * 0.618**60 < 1e-11
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


@dataclass(frozen=True)
class TemperatureChoice:
    """The temperature a model is registered with, and why: the fitted one only when it lowers validation ECE."""

    temperature: float  # what the model applies: ``fitted`` when it helped, else 1.0
    fitted: float
    ece_before: float  # validation ECE of the raw probabilities
    ece_fitted: float  # validation ECE at the fitted temperature
    applied: bool

    def line(self) -> str:
        if self.applied:
            return (f"calibration: temperature {self.fitted:.3f} fitted on validation NLL; ECE validation "
                    f"{self.ece_before:.4f} -> {self.ece_fitted:.4f}")
        return (f"calibration: fitted temperature {self.fitted:.3f} did not lower validation ECE ({self.ece_before:.4f} -> "
                f"{self.ece_fitted:.4f}); kept T = 1 (uncalibrated probabilities)")


def choose_temperature(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> TemperatureChoice:
    """Fit T on validation NLL, keep it only when it lowers validation ECE.

    Why ECE and not NLL: T minimises validation NLL by construction, so NLL could never say "worse";
    ECE is what the reliability plot and the card report, and a fitted T can raise it (a small
    validation split, or label smoothing's already-soft probabilities). Both are measured on the split
    T was fitted on, so "helped" is optimistic; a model that is not helped there is not helped anywhere."""
    fitted = fit_temperature(probs, labels)
    before = expected_calibration_error(probs, labels, bins)
    after = expected_calibration_error(apply_temperature(probs, fitted), labels, bins)
    applied = after < before
    return TemperatureChoice(fitted if applied else 1.0, fitted, before, after, applied)


@dataclass(frozen=True)
class Reliability:
    """Per-bin accuracy and confidence: the numbers behind ECE and the reliability plot."""

    edges: np.ndarray  # [bins + 1]
    counts: np.ndarray  # [bins] images whose top probability falls in the bin
    accuracy: np.ndarray  # [bins] fraction correct in the bin (nan when empty)
    confidence: np.ndarray  # [bins] mean top probability in the bin (nan when empty)
    ece: float


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> Reliability:
    """Top-label reliability: ECE = sum over bins of (n_bin / N) * |accuracy - confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"need probs [N, C] and labels [N] with N > 0, got {probs.shape} and {labels.shape}")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)  # (lo, hi] bins, 0 in the first
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(which, weights=correct, minlength=bins) / counts
        conf = np.bincount(which, weights=confidence, minlength=bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] / len(labels) * np.abs(acc[filled] - conf[filled])))
    return Reliability(edges, counts, acc, conf, ece)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    return reliability(probs, labels, bins).ece
