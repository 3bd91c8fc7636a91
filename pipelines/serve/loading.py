"""A classifier from wherever it lives — a registered model URI or a checkpoint folder — with what inference needs.

``msmae evaluate``, ``msmae predict`` and their Ray actors all load through ``load``, so a model
is scored at the temperature and with the preprocessing it was registered with, whichever
form the user names. A registered model is read from its weights file alone, ``weights_only``
(``registry.registered_weights``): MLflow's own loader would unpickle the pyfunc's ``python_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import msmae
from pipelines import checkpoint
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve.contamination import SeenImages


@dataclass
class LoadedModel:
    """A classifier with what inference needs beside its weights."""

    model: msmae.MSMAEClassifier
    class_names: list[str]
    temperature: float  # 1.0: uncalibrated (a checkpoint from a run that did not finish)
    preprocessing: Preprocessing
    seen: SeenImages | None = None  # the images it was trained and selected on (None: a model from before fingerprints)


def load(ref: str) -> LoadedModel:
    """A classifier from an MLflow model URI (``models:/NAME@champion``, ``runs:/…``) or a checkpoint folder,
    with its temperature and preprocessing (from the registered model, or the checkpoint's ``inference.json``)."""
    if ref.startswith(("models:/", "runs:/")):
        from pipelines.serve import pyfunc, registry

        scorer = pyfunc.scorer_from_state(registry.registered_weights(ref, pyfunc.WEIGHTS_ARTIFACT))
        return LoadedModel(scorer.model, scorer.class_names, scorer.temperature, scorer.preprocessing, scorer.seen)
    if not checkpoint.is_checkpoint(ref):
        raise FileNotFoundError(f"{ref} is neither an MLflow model URI (models:/NAME@alias) nor a checkpoint folder with {checkpoint.STATE_FILE}")
    model, names = checkpoint.load_classifier(ref)
    inference = checkpoint.read_inference(ref)
    preprocessing = Preprocessing.from_dict({"img_size": model.preset.img_size, **inference.get("preprocessing", {})})
    return LoadedModel(model, names, float(inference.get("temperature", 1.0)), preprocessing, SeenImages.from_state(checkpoint.read_seen(ref)))


def load_model(ref: str) -> tuple[msmae.MSMAEClassifier, list[str]]:
    """The classifier and its class names only (see ``load`` for temperature and preprocessing)."""
    loaded = load(ref)
    return loaded.model, loaded.class_names
