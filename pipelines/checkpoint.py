"""The one weights format: a training stage's checkpoint folder, and the registered model's weights file.

Both are a ``torch.save``d dict of tensors and plain values, read with ``weights_only=True`` (a
file someone hands a user can hold tensors, never code), built around the same core —
``model`` (state dict), ``preset`` (``msmae.preset_dict``), ``class_names``, ``num_classes`` —
so one builder (``classifier_from``) rebuilds a classifier from either.

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

import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

import msmae

STATE_FILE = "state.pt"
DIGEST_KEY = "state_sha256"  # in meta.json: the digest of state.pt as written, checked on every load
META_FILE = "meta.json"
INFERENCE_FILE = "inference.json"
SEEN_FILE = "seen_fingerprints.npz"  # fingerprints of the images trained and selected on (pipelines.serve.contamination)


class CheckpointError(ValueError):
    """A weights file that cannot be used: truncated, altered, not ours, or holding more than tensors and plain values."""


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def model_payload(model_state: dict, preset: msmae.ViTPreset, class_names: list[str]) -> dict[str, Any]:
    """The core every weights file holds: enough to rebuild the model at its size with its classes."""
    return {"model": model_state, "preset": msmae.preset_dict(preset), "num_classes": len(class_names), "class_names": list(class_names)}


def write_checkpoint(
    directory: str | Path, *, stage: str, model_state: dict, optimizer_state: dict, table: msmae.AttentionTable | None,
    epoch: int, best: float | None, preset: msmae.ViTPreset, class_names: list[str], metrics: dict, config: dict, **extra: Any,
) -> Path:
    """Write one stage's checkpoint into ``directory`` (created if missing).

    Each file is written whole or not at all (a temporary file, flushed to disk, renamed), and
    ``meta.json`` — written last — records ``state.pt``'s digest: a full disk or a kill leaves no
    ``state.pt`` that passes for a checkpoint, and a file changed afterwards is refused on load.
    ``table`` is None for a stage without attention maps (segmentation); ``extra``: plain values kept in ``state.pt``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {**model_payload(model_state, preset, class_names),
             "optimizer": optimizer_state, "epoch": epoch, "best": best, **extra}
    if table is not None:
        state["table"] = table.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    _write_whole(directory / STATE_FILE, data)
    meta = {"stage": stage, "metrics": metrics, "class_names": class_names, "config": config,
            DIGEST_KEY: hashlib.sha256(data).hexdigest()}
    _write_whole(directory / META_FILE, json.dumps(meta, default=str).encode())
    return directory


def _write_whole(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def read_state(directory: str | Path) -> dict[str, Any]:
    """The saved state (tensors on CPU); a folder without ``state.pt`` is refused with the fix named."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint folder (no {STATE_FILE}); `msmae pretrain` prints one")
    expected = _recorded_digest(Path(directory))
    if expected is not None:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise CheckpointError(f"{path} does not match the digest in its {META_FILE} (truncated or changed after it was "
                                  "written); use another checkpoint, or resume from an earlier one")
    return read_weights(path)


def _recorded_digest(directory: Path) -> str | None:
    try:
        return json.loads((directory / META_FILE).read_text()).get(DIGEST_KEY)
    except (OSError, ValueError, AttributeError):
        return None  # a checkpoint from before digests, or a folder made by hand: loaded on weights_only alone


def read_weights(path: str | Path) -> dict[str, Any]:
    """A weights file (a checkpoint's ``state.pt`` or the registered model's) as tensors and plain values, on CPU.

    ``weights_only=True``: unpickling anything else (a class, a function, a ``__reduce__``) is refused, so a
    file someone hands over cannot run code here. Every way a file can be unusable ends in one
    ``CheckpointError`` naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} was refused: it is not a weights file as msmae writes them — damaged, or holding objects "
                              "beyond tensors and plain values, which could run code when loaded, so it is never unpickled; "
                              "use a checkpoint written by msmae") from None
    except (RuntimeError, EOFError, ValueError, OSError, UnicodeDecodeError, KeyError, IndexError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise CheckpointError(f"{path} is not a readable weights file ({type(e).__name__}: {str(e)[:160]}); it may be "
                              "truncated (a full disk, a copy cut short): use another checkpoint") from None
    if not isinstance(state, dict) or not {"model", "preset", "class_names"} <= set(state):
        raise CheckpointError(f"{path} holds no msmae weights (expected model, preset and class_names); use a checkpoint written by msmae")
    return state


def save_classifier(path: str | Path, model: msmae.MSMAEClassifier, class_names: list[str], **extra: Any) -> None:
    """A classifier's weights file in the same format (plus ``extra`` plain values, e.g. temperature, preprocessing)."""
    torch.save({**model_payload(model.state_dict(), model.preset, class_names), **extra}, path)


def preset_of(state: dict[str, Any]) -> msmae.ViTPreset:
    return msmae.ViTPreset(**state["preset"])


def classifier_from(state: dict[str, Any]) -> msmae.MSMAEClassifier:
    """The classifier a weights dict holds (eval mode, no drop-path)."""
    model = msmae.build_classifier(preset_of(state), len(state["class_names"]), drop_path_rate=0.0)
    model.load_state_dict(state["model"])
    return model.eval()


def load_classifier(directory: str | Path) -> tuple[msmae.MSMAEClassifier, list[str]]:
    """The fine-tuned classifier of a checkpoint (eval mode, no drop-path) and its class names."""
    state = read_state(directory)
    return classifier_from(state), state["class_names"]


def load_pretrain_model(directory: str | Path) -> msmae.MSMAEPretrainModel:
    """The pre-training model (encoder, CLS head, decoder) of a pre-training checkpoint."""
    state = read_state(directory)
    model = msmae.build_pretrain_model(preset_of(state), state["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval()


def load_encoder_into(classifier: msmae.MSMAEClassifier, directory: str | Path) -> None:
    """Initialise a classifier's encoder from a pre-training checkpoint (fine-tuning's start)."""
    msmae.load_pretrained_encoder(classifier, read_state(directory)["model"])


SEGMENTATION = "segmentation"  # the ``task`` of a segmenter's weights (a classifier's weights have none)
SEGMENT_CLASSES = ["lesion"]  # a segmenter's one output channel, as the format's class_names


def save_segmenter(path: str | Path, model, **extra: Any) -> None:
    """A segmenter's weights file: the same core (``task`` = segmentation, the head's width) plus ``extra`` plain values."""
    torch.save({**model_payload(model.state_dict(), model.preset, SEGMENT_CLASSES), "task": SEGMENTATION,
                "decoder_width": model.decoder.classify.in_channels, **extra}, path)


def segmenter_from(state: dict[str, Any]):
    """The segmenter a weights dict holds (eval mode); a classifier's weights are refused with the fix named."""
    from msmae.segmentation import build_segmenter

    if state.get("task") != SEGMENTATION:
        raise CheckpointError("these weights are a classifier's, not a segmenter's; give a checkpoint or model made by `msmae segment`")
    model = build_segmenter(preset_of(state), decoder_width=int(state["decoder_width"]))
    model.load_state_dict(state["model"])
    return model.eval()


def load_segmenter(directory: str | Path):
    """The segmenter of a ``msmae segment`` checkpoint folder (eval mode)."""
    return segmenter_from(read_state(directory))


def write_inference(directory: str | Path, *, temperature: float, preprocessing: dict, calibration: dict) -> Path:
    """Store what inference needs beside the weights: the fitted temperature and the preprocessing."""
    path = Path(directory) / INFERENCE_FILE
    path.write_text(json.dumps({"temperature": temperature, "preprocessing": preprocessing, "calibration": calibration}, indent=2))
    return path


def write_seen(directory: str | Path, state: dict[str, Any]) -> Path:
    """Store ``SeenImages.to_state()`` beside the weights (numpy's format, read back without pickle)."""
    import numpy as np

    path = Path(directory) / SEEN_FILE
    buffer = io.BytesIO()
    np.savez(buffer, fingerprints=state["seen_fingerprints"], threshold=np.float64(state["seen_threshold"]),
             version=np.str_(state["seen_fingerprint_version"]))
    _write_whole(path, buffer.getvalue())
    return path


def read_seen(directory: str | Path) -> dict[str, Any]:
    """The seen-images state of a checkpoint folder; ``{}`` for one without (trained before fingerprints)."""
    import numpy as np

    path = Path(directory) / SEEN_FILE
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return {"seen_fingerprints": data["fingerprints"], "seen_threshold": float(data["threshold"]),
                    "seen_fingerprint_version": str(data["version"])}
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it to evaluate without the contamination check") from None


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
