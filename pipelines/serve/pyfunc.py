"""The registered model: an MLflow pyfunc that takes images and returns labelled, calibrated probabilities.

Why a pyfunc and not the pytorch flavour: a user (or ``mlflow models serve``) should not have to
know the model's image size, resize, mean/std, channel mode, class order or temperature.
``MSMAEPyfunc`` carries all of them and accepts what people have: encoded image bytes (PNG,
JPEG, TIFF, 16-bit PNG, DICOM; base64 in JSON when served), pixel arrays of any size, or file
paths where the operator allows them. It decodes with ingest's own code (``pipelines.data.preprocessing``), so the served model sees
what training saw.

Input: a table with an ``image`` column (bytes, or a numpy array per row) and/or a ``path`` column
(strings); a row uses ``image`` when it has one, else ``path``. Paths are read only where the
operator allowed them (``pipelines.serve.path_guard``: off by default, a served model must not
open files a client names). Output, one row per input row: ``prob_<class>`` per class
(temperature-scaled), ``predicted_class``, ``ok``, ``seen_in_training`` (the input is a near-copy
of an image the model was trained or selected on; ``pipelines.serve.contamination``) and, for an
unusable input, ``reason``/``detail`` (ingest's quarantine vocabulary) with null probabilities
rather than a plausible-looking row. With the parameter ``heatmaps=True`` each row also gets
``heatmap``: the patch-occlusion map of its prediction (``pipelines.serve.explain``), rows of patches.

The model is logged with ``code_paths`` (``msmae/`` and ``pipelines/``), so it loads in a Python
that has the pip requirements but not this project. This module imports mlflow (its base
class) but no Ray: the served model never starts a cluster.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from pipelines.data import images, near_duplicates
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve.contamination import SeenImages

WEIGHTS_ARTIFACT = "classifier"  # the artifact key of the weights file (state dict + preset + names + temperature)
INPUT_COLUMNS = ("image", "path")
NO_INPUT = "no_input"  # a row with neither an image nor a path


@dataclass
class Scored:
    """One batch's results: probabilities ``[N, C]`` (nan where not ok), ok, reason, detail, optional maps."""

    probs: np.ndarray
    ok: np.ndarray
    reason: list[str | None]
    detail: list[str | None]
    heatmaps: list[np.ndarray | None] | None = None
    seen: list[bool | None] | None = None  # per row: a near-copy of a training/validation image (None: unknown)


class ImageScorer:
    """Preprocess, run the classifier at its temperature, optionally explain: shared by the pyfunc and ``msmae predict``."""

    def __init__(self, model, class_names: list[str], temperature: float, preprocessing: Preprocessing,
                 seen: SeenImages | None = None) -> None:
        self.model, self.class_names = model.eval(), list(class_names)
        self.temperature, self.preprocessing, self.seen = float(temperature), preprocessing, seen

    def score(self, sources: list[Any], suffixes: list[str] | None = None, heatmaps: bool = False) -> Scored:
        import torch

        from pipelines.serve import explain

        decoded = [s if isinstance(s, images.Rejected)
                   else self.preprocessing.decode(s, (suffixes or [""] * len(sources))[k]) if s is not None
                   else images.Rejected(NO_INPUT, "the row has neither an image nor a path") for k, s in enumerate(sources)]
        prepared = [d if isinstance(d, images.Rejected) else self.preprocessing.safe_pixels(d) for d in decoded]
        ok = np.array([not isinstance(p, images.Rejected) for p in prepared], dtype=bool)
        seen: list[bool | None] = [None] * len(prepared)
        if self.seen is not None and ok.any():
            flags = iter(self.seen.flags(np.stack([near_duplicates.fingerprint(d) for d, good in zip(decoded, ok) if good])))
            seen = [bool(next(flags)) if good else None for good in ok]
        probs = np.full((len(prepared), len(self.class_names)), np.nan, dtype=np.float64)
        maps: list[np.ndarray | None] | None = [None] * len(prepared) if heatmaps else None
        if ok.any():
            pixels = torch.from_numpy(np.stack([p for p in prepared if not isinstance(p, images.Rejected)]))
            probs[ok] = explain.class_probability(self.model, pixels, self.temperature).double().numpy()
            if heatmaps:
                drops, _ = explain.occlusion_maps(self.model, pixels, self.temperature)
                grids = iter(explain.as_grid(drops, self.model.preset))
                maps = [next(grids) if good else None for good in ok]
        reason = [p.reason if isinstance(p, images.Rejected) else None for p in prepared]
        detail = [p.detail if isinstance(p, images.Rejected) else None for p in prepared]
        return Scored(probs, ok, reason, detail, maps, seen)

    def table(self, scored: Scored) -> pd.DataFrame:
        """The labelled output: prob_<class>..., predicted_class, ok, reason, detail (, heatmap)."""
        names = np.asarray(self.class_names, dtype=object)
        best = np.nan_to_num(scored.probs, nan=-1.0).argmax(1)
        if scored.ok.all():
            out: dict[str, Any] = {f"prob_{name}": scored.probs[:, c] for c, name in enumerate(self.class_names)}
        else:  # a failed row's probabilities are None, not NaN: served as JSON null (NaN is not valid strict JSON)
            out = {f"prob_{name}": pd.Series([float(p) if good else None for p, good in zip(scored.probs[:, c], scored.ok)], dtype=object)
                   for c, name in enumerate(self.class_names)}
        # object columns: a missing class or reason stays None (pandas 3 would make a string column's None NaN)
        out["predicted_class"] = pd.Series([names[b] if good else None for b, good in zip(best, scored.ok)], dtype=object)
        out["ok"] = scored.ok
        out["reason"], out["detail"] = pd.Series(scored.reason, dtype=object), pd.Series(scored.detail, dtype=object)
        out["seen_in_training"] = pd.Series(scored.seen if scored.seen is not None else [None] * len(scored.ok), dtype=object)
        if scored.heatmaps is not None:
            out["heatmap"] = [m.tolist() if m is not None else None for m in scored.heatmaps]
        return pd.DataFrame(out)


def _sources(model_input: Any) -> list[Any]:
    """Each row's image (bytes or array) or path; None for a row with neither."""
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        return [model_input]  # one pixel array
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if not any(c in frame.columns for c in INPUT_COLUMNS):
        raise ValueError(f"input needs an 'image' (bytes or array) or 'path' (string) column; got columns {list(frame.columns)}")
    rows: list[Any] = []
    for k in range(len(frame)):
        image = frame["image"].iloc[k] if "image" in frame.columns else None
        path = frame["path"].iloc[k] if "path" in frame.columns else None
        if isinstance(image, np.ndarray) or (image is not None and not _missing(image)):
            rows.append(np.asarray(image) if isinstance(image, (list, np.ndarray)) else image)
        elif path is not None and not _missing(path):
            rows.append(str(path))
        else:
            rows.append(None)
    return rows


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


class MSMAEPyfunc(mlflow.pyfunc.PythonModel):
    """The registered msmae classifier as a pyfunc (see the module docstring for its input and output)."""

    def load_context(self, context) -> None:
        from pipelines import checkpoint

        self.scorer = scorer_from_state(checkpoint.read_weights(context.artifacts[WEIGHTS_ARTIFACT]))

    # The classifier and its settings, for callers in this project (``pipelines.serve.loading.load``).
    @property
    def model(self):
        return self.scorer.model

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Bad requests (no image or path column) end in an ``MlflowException``: the scoring server then
        answers 400 with the message alone, no server-side stack trace."""
        heatmaps = bool((params or {}).get("heatmaps", False))
        sources, suffixes = request_sources(model_input)
        return self.scorer.table(self.scorer.score(sources, suffixes, heatmaps=heatmaps))


def request_sources(model_input: Any) -> tuple[list, list[str]]:
    """A request's images (bytes, arrays, or paths read under the operator's path guard) and their
    suffixes; a request without an image or path column ends in an ``MlflowException`` (HTTP 400).
    Shared by the classifier's and the segmenter's pyfunc, so both accept the same requests."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from pipelines.serve import path_guard

    try:
        sources = _sources(model_input)
    except ValueError as e:
        raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
    suffixes = [_suffix(s) for s in sources]
    return [path_guard.read_path(s) if isinstance(s, str) else s for s in sources], suffixes


def _suffix(source: Any) -> str:
    return "." + source.rsplit(".", 1)[-1] if isinstance(source, str) and "." in source else ""


def scorer_from_state(state: dict) -> ImageScorer:
    """The scorer a weights file (``weights_file``) describes: the served pyfunc and the project's own loading
    (``pipelines.serve.loading``, which never unpickles the pyfunc) build it the same way."""
    from pipelines import checkpoint

    if state.get("seen_fingerprints") is not None:
        state = {**state, "seen_fingerprints": state["seen_fingerprints"].numpy()}
    return ImageScorer(checkpoint.classifier_from(state), state["class_names"], state["temperature"],
                       Preprocessing.from_dict(state["preprocessing"]), SeenImages.from_state(state))


def weights_file(path, model, class_names: list[str], temperature: float, preprocessing: Preprocessing,
                 seen: SeenImages | None = None) -> None:
    """The pyfunc's one artifact, in the checkpoint format (``pipelines.checkpoint``) plus temperature, preprocessing
    and the fingerprints of the images it was trained and selected on (an int8 tensor: ``weights_only`` loads it)."""
    import torch

    from pipelines import checkpoint

    extra = {}
    if seen is not None:
        state = seen.to_state()
        extra = {**state, "seen_fingerprints": torch.from_numpy(state["seen_fingerprints"])}
    checkpoint.save_classifier(path, model, class_names, temperature=float(temperature), preprocessing=preprocessing.to_dict(), **extra)


def example_image(width: int = 96, height: int = 80) -> bytes:
    """A synthetic PNG for the logged input example (no patient data travels with the model); any size works."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    grey = (127 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()
