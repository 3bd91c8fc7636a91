"""The checkpoint format of a training stage: one folder, written by the Ray worker, read everywhere else.

A checkpoint folder holds ``state.pt`` (model and optimiser state, the attention table,
epoch, best score, and the model's *preset* — architecture and image size — so that
anything loading it rebuilds the right model at the right size without being told) and
``meta.json`` (stage, that epoch's metrics, class names, the resolved config) for people
and tools that should not need torch to read it. The chosen fine-tuning checkpoint also gets
``inference.json`` at the end of a run: the temperature fitted on validation and the
preprocessing (ingest's channel mode and downscale), which ``msmae evaluate`` / ``predict``
apply when given the checkpoint folder instead of the registered model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import msmae

STATE_FILE = "state.pt"
META_FILE = "meta.json"
INFERENCE_FILE = "inference.json"


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def write_checkpoint(
    directory: str | Path, *, stage: str, model_state: dict, optimizer_state: dict, table: msmae.AttentionTable,
    epoch: int, best: float | None, preset: msmae.ViTPreset, class_names: list[str], metrics: dict, config: dict,
) -> Path:
    """Write one stage's checkpoint into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model_state, "optimizer": optimizer_state, "table": table.state_dict(), "epoch": epoch, "best": best,
        "preset": asdict(preset), "num_classes": len(class_names), "class_names": class_names,
    }
    torch.save(state, directory / STATE_FILE)
    meta = {"stage": stage, "metrics": metrics, "class_names": class_names, "config": config}
    (directory / META_FILE).write_text(json.dumps(meta, default=str))
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """The saved state (tensors on CPU); a folder without ``state.pt`` is refused with the fix named."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one")
    return torch.load(path, map_location="cpu", weights_only=False)


def preset_of(state: dict[str, Any]) -> msmae.ViTPreset:
    return msmae.ViTPreset(**state["preset"])


def load_classifier(directory: str | Path) -> tuple[msmae.MSMAEClassifier, list[str]]:
    """The fine-tuned classifier of a checkpoint (eval mode, no drop-path) and its class names."""
    state = read_state(directory)
    model = msmae.build_classifier(preset_of(state), state["num_classes"], drop_path_rate=0.0)
    model.load_state_dict(state["model"])
    return model.eval(), state["class_names"]


def load_pretrain_model(directory: str | Path) -> msmae.MSMAEPretrainModel:
    """The pre-training model (encoder, CLS head, decoder) of a pre-training checkpoint."""
    state = read_state(directory)
    model = msmae.build_pretrain_model(preset_of(state), state["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval()


def load_encoder_into(classifier: msmae.MSMAEClassifier, directory: str | Path) -> None:
    """Initialise a classifier's encoder from a pre-training checkpoint (fine-tuning's start)."""
    msmae.load_pretrained_encoder(classifier, read_state(directory)["model"])


def write_inference(directory: str | Path, *, temperature: float, preprocessing: dict, calibration: dict) -> Path:
    """Store what inference needs beside the weights: the fitted temperature and the preprocessing."""
    path = Path(directory) / INFERENCE_FILE
    path.write_text(json.dumps({"temperature": temperature, "preprocessing": preprocessing, "calibration": calibration}, indent=2))
    return path


def read_inference(directory: str | Path) -> dict[str, Any]:
    """``inference.json`` of a checkpoint; ``{}`` for one a run never finished (temperature 1, default preprocessing)."""
    path = Path(directory) / INFERENCE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to use the checkpoint uncalibrated") from None
    temperature = data.get("temperature")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{path}: 'temperature' must be a positive number, got {temperature!r}")
    return data
