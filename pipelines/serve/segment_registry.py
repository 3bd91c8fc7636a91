"""The registered segmenter: logged as a self-contained pyfunc with its model card, given ``@champion`` when it earns it.

A segmenter is registered under its own name (default ``msmae-<dataset>-segmenter``), so it never
takes a classifier's ``@champion``. Which alias a new version gets is decided before registration by
``pipelines.serve.segment_promotion``, with the classifier's rule (``pipelines.serve.promotion``):
a quality gate first (the bootstrap 95 % lower bound of the validation Dice must clear the trivial
masks "everything is lesion" and "nothing is lesion" on the same images; failing: no alias), then
the champion, if it is a segmenter of the same dataset fingerprint, loaded from the registry
(``registered_predictor``: its weights file alone, read ``weights_only``) and scored on this run's
validation images; a positive margin on the selection metric takes ``@champion``, else
``@challenger``. A champion of another dataset is never replaced (no alias). The reason, the gate's
numbers and the margin with its paired-bootstrap 95 % CI are version tags (``segment_promotion.decision_tags``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

import msmae
from pipelines import tracking
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve import segment_pyfunc
from pipelines.serve.model_card import NOT_FOR_DIAGNOSIS
from pipelines.serve.pyfunc import example_image
from pipelines.serve.registry import SERVING_REQUIREMENTS, _fit, registered_weights


@dataclass(frozen=True)
class SegmenterToRegister:
    model: object  # msmae.segmentation.MSMAESegmenter
    preprocessing: Preprocessing
    threshold: float
    selection_metric: str  # val_dice or val_iou
    selection_value: float
    dataset_fingerprint: str
    step: int  # the chosen epoch
    card: str  # markdown


def default_name(classifier_default: str) -> str:
    """``msmae-ham10000`` -> ``msmae-ham10000-segmenter``."""
    return f"{classifier_default}-segmenter"


def registered_predictor(model_name: str, version: str):
    """The ``MaskPredictor`` of a registered segmenter version from its weights file alone (threshold and preprocessing
    travel in it), read ``weights_only`` (``registry.registered_weights``)."""
    weights = registered_weights(f"models:/{model_name}/{version}", segment_pyfunc.WEIGHTS_ARTIFACT)
    return segment_pyfunc.predictor_from_state(weights)


def register_segmenter(spec: SegmenterToRegister, model_name: str, alias: str | None, tags: dict[str, str] | None = None) -> str:
    """Log the segmenter as a pyfunc (code travels in ``code_paths``), register it, tag it, give it ``alias``. Returns the version."""
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    model = spec.model.cpu().eval()
    example = pd.DataFrame({"image": [example_image()]})
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        outputs=Schema([ColSpec("binary", "mask_png", required=False), ColSpec("long", "height", required=False),
                        ColSpec("long", "width", required=False), ColSpec("double", "lesion_fraction", required=False),
                        ColSpec("boolean", "ok"), ColSpec("string", "reason", required=False), ColSpec("string", "detail", required=False)]),
    )
    with tempfile.TemporaryDirectory(prefix="msmae-segmenter-") as tmp, tracking.without_expected_mlflow_warnings():
        weights = Path(tmp) / "segmenter.pt"
        segment_pyfunc.weights_file(weights, model, spec.preprocessing, spec.threshold)
        info = mlflow.pyfunc.log_model(
            name="segmenter",
            python_model=segment_pyfunc.MSMAESegmentPyfunc(),
            artifacts={segment_pyfunc.WEIGHTS_ARTIFACT: str(weights)},
            code_paths=[str(tracking.REPO / "msmae"), str(tracking.REPO / "pipelines")],
            signature=signature,
            input_example=example,
            pip_requirements=SERVING_REQUIREMENTS,
            metadata={"task": "segmentation", "preset": msmae.preset_dict(model.preset), "preprocessing": spec.preprocessing.to_dict(),
                      "threshold": spec.threshold, "selected_epoch": spec.step, "intended_use": NOT_FOR_DIAGNOSIS},
            registered_model_name=model_name,
            step=spec.step,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.update_registered_model(model_name, description="MSMAE lesion segmenter (ViT encoder + SETR-PUP head): image in, lesion mask "
                                                           f"out at the image's size. {NOT_FOR_DIAGNOSIS}")
    client.update_model_version(model_name, version, description=_fit(spec.card))
    all_tags = {"task": "segmentation", spec.selection_metric: f"{spec.selection_value:.6f}", "dataset_fingerprint": spec.dataset_fingerprint,
                "selected_epoch": str(spec.step), "threshold": f"{spec.threshold:g}", "git_commit": tracking.git_commit(),
                "intended_use": "research only, not for diagnostic use", **(tags or {})}
    for key, value in all_tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
    return version
