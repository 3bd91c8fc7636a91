"""MLflow: where runs go, what is logged, and the model registry with the ``champion`` alias."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

import msmae

CHAMPION = "champion"
# Requirements recorded with the model; giving them avoids MLflow's slow inference (~20 s).
MODEL_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "timm==1.0.31", "msmae-ray==0.1.0"]


def resolve_tracking_uri(explicit: str | None, workdir: Path) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the working folder.

    The SQLite path is made absolute so Ray workers (other working directories) write to
    the same store as the driver.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


def log_params(params: dict) -> None:
    """Log a flat parameter dict (MLflow caps a batch at 100 params)."""
    items = [(k, "null" if v is None else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def register_model(
    model: msmae.MSMAEClassifier,
    model_name: str,
    class_names: list[str],
    metric_name: str,
    metric_value: float,
    dataset_fingerprint: str,
    example: torch.Tensor,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """Log the classifier to the active run, register it, and move ``champion`` if it wins.

    Returns ``(version, became_champion)``. The comparison is only against a champion
    evaluated on the same validation split (same dataset fingerprint); a champion from
    another dataset is replaced.
    """
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        probs = model(example).softmax(-1)
    signature = infer_signature(example.numpy(), probs.numpy())
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",  # the module itself comes back (attention maps, hooks)
        signature=signature,
        pip_requirements=MODEL_REQUIREMENTS,
        metadata={"class_names": class_names, "preset": msmae.models.preset_dict(model.preset)},
        registered_model_name=model_name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {metric_name: f"{metric_value:.6f}", "dataset_fingerprint": dataset_fingerprint, "class_names": ",".join(class_names), **(extra_tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    beats = _beats_champion(client, model_name, metric_name, metric_value, dataset_fingerprint)
    if beats:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return version, beats


def _beats_champion(client: MlflowClient, name: str, metric_name: str, value: float, fingerprint: str) -> bool:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return True  # no champion yet
    if champion.tags.get("dataset_fingerprint") != fingerprint:
        return True
    current = float(champion.tags.get(metric_name, "nan"))
    return math.isnan(current) or value > current


def load_champion(model_uri: str) -> msmae.MSMAEClassifier:
    """``models:/NAME@champion`` (or any model URI) back as the msmae classifier module."""
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
