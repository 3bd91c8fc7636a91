"""Which inputs a model has seen: near-copies of the images it was trained and selected on.

Medical image collections are full of re-encoded and resized copies, so an "outside" test set
often holds images the model trained on, and its metrics flatter the model. A model carries
the fingerprints (``pipelines.data.near_duplicates``, 256 bytes an image) of its training and
validation images — in the registered pyfunc's weights file and in the chosen checkpoint's
``seen_fingerprints.npz`` — so ``msmae evaluate`` can report metrics on the unseen part beside
all, and ``msmae predict`` and the served model can flag each input ``seen_in_training``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data import near_duplicates
from pipelines.data.dataset import IngestedDataset

SEEN_SPLITS = ("train", "val")  # trained on, and chosen on


@dataclass(frozen=True)
class SeenImages:
    fingerprints: np.ndarray  # [N, FINGERPRINT_BYTES] int8
    threshold: float = near_duplicates.DEFAULT_THRESHOLD
    version: str = near_duplicates.FINGERPRINT_VERSION

    @classmethod
    def from_dataset(cls, dataset: IngestedDataset) -> "SeenImages | None":
        """The training and validation images of ``dataset``; None for a dataset ingested before fingerprints."""
        _, fps = dataset.fingerprints(SEEN_SPLITS)
        if not len(fps):
            return None
        threshold = (dataset.summary.get("near_duplicates") or {}).get("threshold") or near_duplicates.DEFAULT_THRESHOLD
        return cls(fps, float(threshold))

    def flags(self, query: np.ndarray) -> np.ndarray:
        """Per query fingerprint: is it a near-copy of a seen image? (a flat image, all zeros, never is)"""
        query = near_duplicates.as_array(query)
        if not len(query):
            return np.zeros(0, dtype=bool)
        return near_duplicates.seen_in(self.fingerprints, query, self.threshold)

    def to_state(self) -> dict:
        """Plain values and an int8 tensor-compatible array, for a ``weights_only`` weights file."""
        return {"seen_fingerprints": self.fingerprints, "seen_threshold": float(self.threshold), "seen_fingerprint_version": self.version}

    @classmethod
    def from_state(cls, state: dict) -> "SeenImages | None":
        fps = state.get("seen_fingerprints")
        if fps is None or state.get("seen_fingerprint_version") != near_duplicates.FINGERPRINT_VERSION:
            return None  # a model from before fingerprints, or made with another recipe: nothing comparable
        return cls(np.asarray(fps, dtype=np.int8), float(state["seen_threshold"]), state["seen_fingerprint_version"])
