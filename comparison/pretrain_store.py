"""Pre-trainings kept on disk: reused, resumed after an interruption, and snapshotted part-way.

Why a store at all: a pre-training is the longest part of a compared method, and the GPU box
this harness runs on caps each command (10 minutes) and can end a session at any time. Saved
here, a pre-training outlives the process that ran it: the next command fine-tunes from it
(``compare.py --stage pretrain``, then the same command without it), a killed one resumes
from its latest saved epoch, and the encoders saved at chosen epochs (snapshots) are what
the pre-training-length curve fine-tunes from.

What is here: ``PretrainCache`` (finished pre-trainings by key, in memory and on disk),
``Checkpointing`` (where one running pre-training keeps its state and snapshots),
``save_training_state`` / ``restore_training_state`` (that state, written after an epoch and
put back before the next), ``save_atomic`` (every file whole or not at all), and
``StageResult``, what a stage leaves behind and so what the store keeps. The training itself
is ``comparison.runner``'s; it calls in here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import msmae
from comparison.augment import TrainBatches


@dataclass
class StageResult:
    """A stage's curve (one row an epoch) and seconds: what a saved pre-training holds and a resumed one carries on."""

    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # pre-training by attention: every training image's map from the final model ([N, L], CPU),
    # which frozen-map fine-tuning draws from
    maps: torch.Tensor | None = None


def save_atomic(payload: dict, path: Path) -> None:
    """``torch.save`` to a side file, then rename: a killed process leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_suffix(".partial")
    torch.save(payload, partial_path)
    partial_path.replace(path)


def _cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def _load(path: Path, key: str) -> dict:
    """A saved file's payload, refused when it belongs to another pre-training than ``key``
    (the file names are a hash of the key: a stale file under the same name is not reused)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    if saved["key"] != key:
        raise ValueError(f"{path} holds another pre-training ({saved['key'][:120]}...); remove it")
    return saved


@dataclass(frozen=True)
class Checkpointing:
    """Where one long pre-training keeps its state, so it survives an interruption.

    Every ``every`` epochs the whole training state (model, optimiser, attention table, the
    random generators, the SAM start, the curve) replaces ``<stem>-latest.pt``; at each epoch
    count in ``snapshots`` the model and its curve go to ``<stem>-e<epochs>.pt``, to fine-tune
    from (the pre-training-length curve). Files are written whole or not at all.
    """

    directory: Path
    stem: str
    every: int | None = None
    snapshots: tuple[int, ...] = ()

    @property
    def latest(self) -> Path:
        return self.directory / f"{self.stem}-latest.pt"

    def snapshot(self, epochs: int) -> Path:
        return self.directory / f"{self.stem}-e{epochs}.pt"

    def load_latest(self, key: str) -> dict | None:
        return _load(self.latest, key) if self.latest.is_file() else None

    def due(self, epochs_done: int, total: int) -> bool:
        return self.every is not None and (epochs_done % self.every == 0 or epochs_done == total)


def save_training_state(checkpoints: Checkpointing, key: str, trainer: msmae.StageTrainer, batches: TrainBatches,
                        epoch: int, result: StageResult) -> None:
    """Save what ``checkpoints`` asks for after ``epoch`` (the training state, a snapshot, both or nothing)."""
    done, total = epoch + 1, trainer.schedule.epochs
    if done in checkpoints.snapshots:
        save_atomic({"key": key, "epochs": done, "encoder_state": _cpu(trainer.model.state_dict()),
                     "curve": result.curve, "seconds": result.seconds}, checkpoints.snapshot(done))
    if checkpoints.due(done, total):
        masking = trainer.schedule.masking
        save_atomic({
            "key": key, "epochs_done": done, "model": _cpu(trainer.model.state_dict()), "optimizer": _cpu(trainer.optimizer.state_dict()),
            "table": trainer.table.state_dict() if trainer.table is not None else None,
            "generators": [batches.generator.get_state(), trainer.generator.get_state()], "rng": torch.get_rng_state(),
            "sam_start": masking.sam_start if masking is not None else None, "curve": result.curve, "seconds": result.seconds,
        }, checkpoints.latest)


def restore_training_state(state: dict, trainer: msmae.StageTrainer, batches: TrainBatches) -> StageResult:
    """Put a saved training state back into ``trainer`` and ``batches``; the stage so far."""
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.table is not None and state["table"] is not None:
        trainer.table.maps.copy_(state["table"]["maps"])
        trainer.table.refreshed_at = state["table"]["refreshed_at"]
    batches.generator.set_state(state["generators"][0])
    trainer.generator.set_state(state["generators"][1])
    torch.set_rng_state(state["rng"])
    if state["sam_start"] is not None:
        trainer.schedule = replace(trainer.schedule, masking=replace(trainer.schedule.masking, sam_start=state["sam_start"]))
    return StageResult(list(state["curve"]), float(state["seconds"]))


@dataclass
class PretrainCache:
    """Pre-trained encoders kept for reuse, keyed by what determines them.

    ``msmae``, ``msmae_frozen_maps`` and ``msmae_ft_all`` pre-train identically (same seed,
    same recipe): the later ones reuse the first's encoder, so their results differ only by
    fine-tuning. With a ``directory`` every pre-training is also saved there and found by a
    later process: a GPU box whose commands are capped at 10 minutes pre-trains in one call
    and fine-tunes in the next (``compare.py --stage pretrain``, then the same command
    without it). With ``checkpoint_every`` and ``snapshots`` (both need the directory) a long
    pre-training also saves its state as it goes and resumes after an interruption
    (``Checkpointing``), and keeps encoders to fine-tune from at the ``snapshots`` epochs.
    """

    entries: dict[tuple, StageResult | tuple] = field(default_factory=dict)
    directory: Path | None = None
    checkpoint_every: int | None = None
    snapshots: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.directory is None and (self.checkpoint_every or self.snapshots):
            raise ValueError("checkpoints and snapshots of pre-training need a directory (--pretrained-dir)")

    def path(self, key: tuple) -> Path:
        return self.directory / f"pretrain-{self.stem(key)}.pt"

    @staticmethod
    def stem(key: tuple) -> str:
        return hashlib.sha1(repr(key).encode()).hexdigest()[:16]

    def checkpointing(self, key: tuple) -> Checkpointing | None:
        """Where ``key``'s pre-training checkpoints live (with a directory: a pre-training left
        half-done by an earlier command resumes even when this one saves no checkpoints)."""
        if self.directory is None:
            return None
        return Checkpointing(self.directory, f"pretrain-{self.stem(key)}", self.checkpoint_every, tuple(self.snapshots))

    def get(self, key: tuple) -> tuple[dict, StageResult] | None:
        if key not in self.entries and self.directory is not None and self.path(key).is_file():
            saved = _load(self.path(key), repr(key))
            self.entries[key] = (saved["encoder_state"], StageResult(saved["curve"], saved["seconds"], saved.get("maps")))
        return self.entries.get(key)

    def put(self, key: tuple, encoder_state: dict, result: StageResult) -> None:
        self.entries[key] = (encoder_state, result)
        if self.directory is not None:  # written whole or not at all: a killed call leaves no half file
            payload = {"key": repr(key), "encoder_state": _cpu(encoder_state), "curve": result.curve, "seconds": result.seconds,
                       "maps": result.maps}
            save_atomic(payload, self.path(key))
            checkpoints = self.checkpointing(key)
            if checkpoints is not None:  # finished: the training state is no longer needed
                checkpoints.latest.unlink(missing_ok=True)

    def snapshot(self, key: tuple, epochs: int) -> tuple[dict, StageResult]:
        """The encoder saved after ``epochs`` epochs of the pre-training ``key`` (``snapshots``)."""
        path = self.checkpointing(key).snapshot(epochs) if self.checkpointing(key) else None
        if path is None or not path.is_file():
            raise FileNotFoundError(f"no snapshot after {epochs} pre-training epochs ({path}); "
                                    f"pre-train with snapshots {list(self.snapshots)} including {epochs}")
        saved = _load(path, repr(key))
        return saved["encoder_state"], StageResult(saved["curve"], saved["seconds"])
