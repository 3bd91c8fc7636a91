"""``msmae predict``: batch inference over a folder of images with Ray Data, written to Parquet.

Every file under the folder yields exactly one row, whatever it is: an image gets its class
and probabilities; anything else (not an image, a broken or looping symlink, a decompression
bomb, a truncated file) gets ``ok = false`` with the same ``reason`` ingest would quarantine it
for, and a ``detail``. Images are decoded and normalised exactly as ingest does it (16-bit
contrast, alpha on black, DICOM windowing), so the model sees what it was trained on.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipelines import images
from pipelines.sources import scan_tree
from pipelines.transforms import normalise, resize_whole


class Predictor:
    """A Ray Data callable class: the model is loaded once per actor, not per batch."""

    def __init__(self, model_ref: str, tracking_uri: str) -> None:
        import mlflow

        from pipelines.evaluate import load_model

        mlflow.set_tracking_uri(tracking_uri)  # this actor is another process than the driver
        self.model, self.class_names = load_model(model_ref)
        self.img_size = self.model.preset.img_size  # the size it was trained at, carried by the model

    def load(self, path: str) -> tuple[np.ndarray | None, str | None, str | None]:
        """(normalised pixels, None, None), or (None, reason, detail) for a file that is not a usable image."""
        image = images.load_image(path, "RGB")
        if isinstance(image, images.Rejected):
            return None, image.reason, image.detail
        try:
            return normalise(resize_whole(image, self.img_size)), None, None
        except (OSError, ValueError, MemoryError) as e:
            return None, images.CORRUPT, f"{type(e).__name__}: {e}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import msmae

        loaded = [self.load(str(p)) for p in batch["path"]]
        ok = np.array([pixels is not None for pixels, _, _ in loaded])
        probs = np.full((len(loaded), len(self.class_names)), np.nan, dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.stack([p for p, _, _ in loaded if p is not None]))
            probs[ok] = msmae.predict_probs(self.model, pixels).numpy()
        names = np.asarray(self.class_names, dtype=object)
        predicted = np.where(ok, names[np.nan_to_num(probs, nan=0.0).argmax(1)], None)
        return {
            "path": batch["path"], "predicted_class": predicted, "ok": ok, "probabilities": probs,
            "reason": np.array([r for _, r, _ in loaded], dtype=object), "detail": np.array([d for _, _, d in loaded], dtype=object),
        }


def predict_folder(model_ref: str, input_dir: Path, out: Path, batch_size: int = 64) -> dict:
    """Predict every file under ``input_dir`` (recursively, folder links followed); one row per file.

    The model is loaded and the folder listed before Ray starts, so a wrong ``--model`` or an
    empty folder fails in seconds; the Parquet file is written whole or not at all.
    """
    import mlflow

    from pipelines.evaluate import load_model
    from pipelines.local_ray import ensure_ray
    from pipelines.outputs import write_atomic

    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir} is not a folder")
    entries = scan_tree(input_dir)
    if not entries:
        raise FileNotFoundError(f"--input {input_dir} holds no files")
    _, class_names = load_model(model_ref)
    rows = [
        {"path": str(input_dir / e.rel), "predicted_class": None, "ok": False, "reason": e.problem, "detail": e.detail, "probabilities": None}
        for e in entries if e.problem
    ]
    readable = [str(input_dir / e.rel) for e in entries if not e.problem]
    if readable:
        ensure_ray()
        ds = ray.data.from_items([{"path": p} for p in readable])
        ds = ds.map_batches(Predictor, fn_constructor_args=(model_ref, mlflow.get_tracking_uri()), batch_size=batch_size,
                            concurrency=1, batch_format="numpy")
        rows += ds.take_all()
    rows.sort(key=lambda r: r["path"])
    write_atomic(out, _parquet_bytes(rows, class_names))
    reasons = Counter(r["reason"] for r in rows if not r["ok"])
    return {"images": len(rows), "unreadable": sum(reasons.values()), "reasons": dict(reasons), "out": str(out)}


def _parquet_bytes(rows: list[dict], class_names: list[str]) -> bytes:
    """path, predicted_class, ok, reason, detail, prob_<class>... (probabilities null where ok is false)."""
    def prob(row: dict, c: int) -> float | None:
        return float(row["probabilities"][c]) if row["ok"] else None

    table = pa.table({
        "path": pa.array([r["path"] for r in rows], pa.string()),
        "predicted_class": pa.array([r["predicted_class"] for r in rows], pa.string()),
        "ok": pa.array([bool(r["ok"]) for r in rows], pa.bool_()),
        "reason": pa.array([r["reason"] for r in rows], pa.string()),
        "detail": pa.array([r["detail"] for r in rows], pa.string()),
        **{f"prob_{name}": pa.array([prob(r, c) for r in rows], pa.float64()) for c, name in enumerate(class_names)},
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
