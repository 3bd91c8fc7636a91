"""The model registry: the chosen classifier logged as a self-contained pyfunc, its model card, its alias.

Which alias a version gets (``@champion``, ``@challenger`` or none) is decided before it is
registered, by ``pipelines.serve.promotion`` (quality gate, same classes and dataset fingerprint,
a comparison with the champion on the same validation split); this file applies it. The
registered model's default name comes from the dataset (``default_model_name``), so two datasets
never share a champion unless the user names them alike. Loading by URI is here too, so
everything that reads or writes registered models is in one file.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

import msmae
from pipelines import tracking
from pipelines.config import RunConfig
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve import pyfunc
from pipelines.serve.contamination import SeenImages
from pipelines.serve.model_card import NOT_FOR_DIAGNOSIS

CHAMPION = "champion"  # the alias models:/NAME@champion answers with; moved only as pipelines.serve.promotion decides
# What the registered model needs to load and run in a fresh environment (its code travels in
# code_paths, so msmae-ray itself is not one); giving them avoids MLflow's slow inference (~20 s).
SERVING_REQUIREMENTS = [
    f"torch=={torch.__version__.split('+')[0]}", "torchvision==0.29.1", "timm==1.0.31", f"mlflow=={mlflow.__version__}",
    "pillow>=11", "numpy", "pandas", "pydicom==3.0.2",
]


@dataclass(frozen=True)
class ModelToRegister:
    """Everything the registry gets about one model, gathered by ``pipelines.train.finish``."""

    model: msmae.MSMAEClassifier
    class_names: list[str]
    temperature: float
    preprocessing: Preprocessing
    selection_metric: str  # e.g. val_macro_f1, compared against the champion's
    selection_value: float
    dataset_fingerprint: str
    step: int  # the fine-tuning epoch chosen: the run's metrics at this step are linked to the model
    version_description: str  # the model card (markdown)
    model_description: str  # the registered model's description (what every version is)
    tags: Mapping[str, str] = field(default_factory=dict)
    seen: SeenImages | None = None  # fingerprints of the training and validation images, for the contamination check


def register_model(spec: ModelToRegister, model_name: str, alias: str | None = None) -> str:
    """Log the classifier as a self-contained pyfunc, register it with its model card, give it ``alias`` (if any).

    Returns the new version. ``alias`` is ``promotion.decide``'s: ``champion`` moves only to a
    version that passed the quality gate and beat the champion on the same split; ``challenger``
    marks one that passed but did not. ``step`` links the run's metrics at the chosen epoch (and
    anything else logged at that step number, e.g. ``pretrain/*`` of the same epoch index)
    to the logged model, which is MLflow 3's model-metric linkage.
    """
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array


    model = spec.model.cpu().eval()
    example = pd.DataFrame({"image": [pyfunc.example_image()]})
    scorer = pyfunc.ImageScorer(model, spec.class_names, spec.temperature, spec.preprocessing, spec.seen)
    output = scorer.table(scorer.score(pyfunc._sources(example)))
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        outputs=Schema([ColSpec("double", f"prob_{n}") for n in spec.class_names]
                       + [ColSpec("string", "predicted_class", required=False), ColSpec("boolean", "ok"),
                          ColSpec("string", "reason", required=False), ColSpec("string", "detail", required=False),
                          ColSpec("boolean", "seen_in_training", required=False),
                          ColSpec(Array(Array("double")), "heatmap", required=False)]),  # with params heatmaps=True
        params=ParamSchema([ParamSpec("heatmaps", "boolean", False)]),
    )
    if list(output.columns) != [c.name for c in signature.outputs.inputs][:-1]:  # the signature says what predict returns
        raise AssertionError(f"pyfunc output columns {list(output.columns)} differ from its signature")
    with tempfile.TemporaryDirectory(prefix="msmae-model-") as tmp, tracking.without_expected_mlflow_warnings():
        weights = Path(tmp) / "classifier.pt"
        pyfunc.weights_file(weights, model, spec.class_names, spec.temperature, spec.preprocessing, spec.seen)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc.MSMAEPyfunc(),
            artifacts={pyfunc.WEIGHTS_ARTIFACT: str(weights)},
            code_paths=[str(tracking.REPO / "msmae"), str(tracking.REPO / "pipelines")],  # loads without this project installed
            signature=signature,
            input_example=example,
            pip_requirements=SERVING_REQUIREMENTS,
            metadata={"class_names": spec.class_names, "preset": msmae.preset_dict(model.preset),
                      "temperature": spec.temperature, "preprocessing": spec.preprocessing.to_dict(),
                      "selected_epoch": spec.step, "intended_use": NOT_FOR_DIAGNOSIS},
            registered_model_name=model_name,
            step=spec.step,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    client.update_registered_model(model_name, description=_fit(spec.model_description))
    client.update_model_version(model_name, version, description=_fit(spec.version_description))
    tags = {
        spec.selection_metric: f"{spec.selection_value:.6f}", "dataset_fingerprint": spec.dataset_fingerprint,
        "class_names": ",".join(spec.class_names), "temperature": f"{spec.temperature:.6f}", "selected_epoch": str(spec.step),
        "git_commit": tracking.git_commit(), "intended_use": "research only, not for diagnostic use", **spec.tags,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
    return version


_DESCRIPTION_LIMIT = 5000  # MLflow's SQL registry stores at most 5,000 characters per description


def _fit(text: str) -> str:
    if len(text) <= _DESCRIPTION_LIMIT:
        return text
    note = "\n\n(truncated: the full model card is the run artifact model_card.md)"
    return text[:_DESCRIPTION_LIMIT - len(note)] + note


def default_name(dataset_summary: dict, dataset_path: str | Path) -> str:
    """``msmae-<dataset>``: the source folder's (or manifest's) name, else the ingested folder's, as MLflow
    accepts a registered model's name (letters, digits, ``-``, ``_``, ``.``). One name per dataset, so
    one dataset's model never takes another's ``@champion``."""
    origin = dataset_summary.get("source") or {}
    raw = origin.get("root") or origin.get("manifest")
    stem = Path(str(raw)).stem if origin.get("manifest") and not origin.get("root") else Path(str(raw or dataset_path)).name
    if stem in ("", ".", "data"):  # `msmae run` ingests into WORKDIR/data: that name says nothing
        stem = Path(str(dataset_path)).resolve().parent.name or "dataset"
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "dataset"
    return f"msmae-{safe.lower()}"


def with_default_names(cfg: RunConfig, dataset_summary: dict, dataset_path: str | Path) -> RunConfig:
    """``cfg`` with ``tracking.model_name`` and ``tracking.experiment`` set to ``default_name`` where the user set none."""
    name = default_name(dataset_summary, dataset_path)
    values = {k: name for k in ("tracking.model_name", "tracking.experiment") if getattr(cfg.tracking, k.split(".")[1]) is None}
    return cfg.with_values(values) if values else cfg


def model_info(model_uri: str):
    return mlflow.models.get_model_info(model_uri)


def registered_weights(model_uri: str, artifact: str) -> dict:
    """The state in a registered pyfunc's weights artifact (``artifact``: its key), read ``weights_only``.

    ``mlflow.pyfunc.load_model`` would unpickle the model's ``python_model``: a registry entry written by
    someone else could run code here. Everything msmae needs travels in the weights file, so the project's own
    commands (evaluate, predict, the champion's re-scoring) read that file alone."""
    from pipelines import checkpoint

    flavors = model_info(model_uri).flavors or {}
    entry = (flavors.get("python_function", {}).get("artifacts") or {}).get(artifact)
    if not entry:
        legacy = " (it was logged with the pytorch flavour, a pickled module msmae no longer loads)" if "pytorch" in flavors else ""
        raise ValueError(f"{model_uri} has no '{artifact}' weights artifact{legacy}; register it again with msmae "
                         "(`msmae finetune` or `msmae segment`), or pass a checkpoint folder")
    with tempfile.TemporaryDirectory(prefix="msmae-registered-") as tmp:
        root = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        return checkpoint.read_weights(Path(root) / entry["path"])
