"""``msmae predict``: batch inference over a folder of images with Ray Data, written to Parquet."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image, UnidentifiedImageError

from pipelines.transforms import normalise, resize_whole

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class Predictor:
    """A Ray Data callable class: the model is loaded once per actor, not per batch."""

    def __init__(self, model_ref: str, tracking_uri: str) -> None:
        import mlflow

        from pipelines.evaluate import load_model

        mlflow.set_tracking_uri(tracking_uri)  # this actor is another process than the driver
        self.model, self.class_names = load_model(model_ref)
        self.img_size = self.model.preset.img_size  # the size it was trained at, carried by the model

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, ok = [], []
        for data in batch["bytes"]:
            try:
                with Image.open(io.BytesIO(data)) as img:
                    img = resize_whole(img.convert("RGB"), self.img_size)
                images.append(normalise(img))
                ok.append(True)
            except (UnidentifiedImageError, OSError):
                images.append(np.zeros((3, self.img_size, self.img_size), np.float32))
                ok.append(False)
        import msmae

        probs = msmae.predict_probs(self.model, torch.from_numpy(np.stack(images))).numpy()
        ok_mask = np.asarray(ok)
        predicted = np.where(ok_mask, np.asarray(self.class_names, dtype=object)[probs.argmax(1)], None)
        return {"path": batch["path"], "predicted_class": predicted, "ok": ok_mask, "probabilities": probs}


def predict_folder(model_ref: str, input_dir: Path, out: Path, batch_size: int = 64) -> dict:
    """Predict every image under ``input_dir`` (recursively); unreadable files get ``ok=False``."""
    import mlflow

    from pipelines.evaluate import load_model

    _, class_names = load_model(model_ref)
    paths = sorted(str(p) for p in Path(input_dir).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {input_dir}")
    ds = ray.data.read_binary_files(paths, include_paths=True)
    ds = ds.map_batches(Predictor, fn_constructor_args=(model_ref, mlflow.get_tracking_uri()), batch_size=batch_size, concurrency=1, batch_format="numpy")
    rows = ds.take_all()
    table = pa.table({
        "path": [r["path"] for r in rows],
        "predicted_class": [r["predicted_class"] for r in rows],
        "ok": [bool(r["ok"]) for r in rows],
        **{f"prob_{name}": [float(r["probabilities"][c]) for r in rows] for c, name in enumerate(class_names)},
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return {"images": len(rows), "unreadable": int(sum(not r["ok"] for r in rows)), "out": str(out)}
