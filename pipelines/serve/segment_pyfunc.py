"""The registered segmenter: an MLflow pyfunc that takes images and returns each one's lesion mask at the input's size.

Same contract as the classifier's pyfunc (``pipelines.serve.pyfunc``): a table with an ``image``
column (encoded bytes, or a pixel array per row) and/or a ``path`` column (read only where the
operator allowed it, ``pipelines.serve.path_guard``), or one array / bytes value. Each image is
decoded with ingest's own code (``pipelines.data.preprocessing``: 16-bit contrast, alpha, DICOM,
the dataset's channel mode and ``--max-side`` downscale), resized whole to the model's size and
normalised as the training and validation streams do; the lesion probabilities are resized back
(bilinear) to the size the image came in at and thresholded. Output, one row per input row:

    mask            uint8 [H, W] array, 1 = lesion, H x W = the input's size (None when not ok)
    mask_png        the same mask as a 1-bit PNG (0 / 255), bytes
    height, width   the input's size
    lesion_fraction share of the pixels marked lesion
    ok, reason, detail  as the classifier's (ingest's quarantine vocabulary for an unusable input)

This module imports mlflow (its base class) but no Ray.
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipelines.data import images
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve.pyfunc import NO_INPUT, request_sources

WEIGHTS_ARTIFACT = "segmenter"
OUTPUT_COLUMNS = ("mask", "mask_png", "height", "width", "lesion_fraction", "ok", "reason", "detail")


@dataclass
class Masks:
    """One batch's masks (None where not ok) and why a row failed."""

    masks: list[np.ndarray | None]
    reason: list[str | None]
    detail: list[str | None]


def mask_png(mask: np.ndarray) -> bytes:
    """A 0/1 mask as a 1-bit PNG (0 background, 255 lesion), the format ingest stores masks in."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).convert("1").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


class MaskPredictor:
    """Decode, segment, resize back, threshold: shared by the pyfunc, ``msmae predict`` and the run's final evaluation."""

    def __init__(self, model, preprocessing: Preprocessing, threshold: float = 0.5) -> None:
        self.model, self.preprocessing, self.threshold = model.eval(), preprocessing, float(threshold)
        # decoded at the input's own size first (to return the mask at it), then ingest's downscale, as training's images had
        self._full_size = dataclasses.replace(preprocessing, max_side=None)

    def prepare(self, source: Any, suffix: str = "") -> tuple[np.ndarray, tuple[int, int]] | images.Rejected:
        """The model's input ``[3, S, S]`` and the input's ``(height, width)``, or why the input is unusable."""
        if source is None:
            return images.Rejected(NO_INPUT, "the row has neither an image nor a path")
        if isinstance(source, images.Rejected):
            return source
        img = self._full_size.decode(source, suffix)
        if isinstance(img, images.Rejected):
            return img
        pixels = self.preprocessing.safe_pixels(images.downscale(img, self.preprocessing.max_side))
        return pixels if isinstance(pixels, images.Rejected) else (pixels, (img.height, img.width))

    def probabilities(self, pixels: np.ndarray, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """Lesion probabilities ``[H, W]`` per image at its own size, from model inputs ``[N, 3, S, S]``."""
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            probs = torch.sigmoid(self.model(torch.from_numpy(pixels)))  # [N, 1, S, S]
            return [F.interpolate(p[None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy() for p, size in zip(probs, sizes)]

    def predict(self, sources: list[Any], suffixes: list[str] | None = None) -> Masks:
        prepared = [self.prepare(s, (suffixes or [""] * len(sources))[k]) for k, s in enumerate(sources)]
        good = [k for k, p in enumerate(prepared) if not isinstance(p, images.Rejected)]
        masks: list[np.ndarray | None] = [None] * len(prepared)
        if good:
            probs = self.probabilities(np.stack([prepared[k][0] for k in good]), [prepared[k][1] for k in good])
            for k, p in zip(good, probs):
                masks[k] = (p > self.threshold).astype(np.uint8)
        reason = [p.reason if isinstance(p, images.Rejected) else None for p in prepared]
        detail = [p.detail if isinstance(p, images.Rejected) else None for p in prepared]
        return Masks(masks, reason, detail)

    @staticmethod
    def table(result: Masks) -> pd.DataFrame:
        ok = [m is not None for m in result.masks]
        return pd.DataFrame({
            "mask": pd.Series(result.masks, dtype=object),
            "mask_png": pd.Series([mask_png(m) if m is not None else None for m in result.masks], dtype=object),
            "height": pd.Series([m.shape[0] if m is not None else None for m in result.masks], dtype=object),
            "width": pd.Series([m.shape[1] if m is not None else None for m in result.masks], dtype=object),
            "lesion_fraction": pd.Series([float(m.mean()) if m is not None else None for m in result.masks], dtype=object),
            "ok": np.array(ok, dtype=bool),
            "reason": pd.Series(result.reason, dtype=object),
            "detail": pd.Series(result.detail, dtype=object),
        })


class MSMAESegmentPyfunc(mlflow.pyfunc.PythonModel):
    """The registered msmae segmenter as a pyfunc (see the module docstring for its input and output)."""

    def load_context(self, context) -> None:
        from pipelines import checkpoint

        self.predictor = predictor_from_state(checkpoint.read_weights(context.artifacts[WEIGHTS_ARTIFACT]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        sources, suffixes = request_sources(model_input)
        return self.predictor.table(self.predictor.predict(sources, suffixes))


def predictor_from_state(state: dict) -> MaskPredictor:
    """The predictor a weights file (``weights_file``) describes, for the served pyfunc and the project's own
    loading alike (``segment_predict.load_predictor``, ``segment_registry.registered_predictor``)."""
    from pipelines import checkpoint

    return MaskPredictor(checkpoint.segmenter_from(state), Preprocessing.from_dict(state["preprocessing"]), float(state["threshold"]))


def weights_file(path, model, preprocessing: Preprocessing, threshold: float) -> None:
    """The pyfunc's one artifact, in the checkpoint format (``pipelines.checkpoint.save_segmenter``) plus preprocessing and threshold."""
    from pipelines import checkpoint

    checkpoint.save_segmenter(path, model, preprocessing=preprocessing.to_dict(), threshold=float(threshold))
