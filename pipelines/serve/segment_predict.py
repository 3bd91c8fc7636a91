"""``msmae predict`` with a segmenter: Ray Data over a folder tree, one lesion mask per image at the image's own size.

    FolderListing (read tasks) → MaskBatchScorer (an actor pool: the segmenter loaded once per actor;
    each file decoded with the served decode path, ``MaskPredictor``) → write_parquet (staging, renamed into place)

Unlike classification, decoding runs inside the scoring actor: the mask must come back at each
image's own size, so the actor needs the decoded image, not pixels already resized to the model's
size. Every file yields one row — ``path, ok, reason, detail, height, width, lesion_fraction,
mask_png`` (a 1-bit PNG, null where not ok) — and with ``--masks DIR`` each mask is also written as
``DIR/<path under the input>.png`` (drawn by the driver from the finished shards, then swapped in).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from pipelines.data import images
from pipelines.data.preprocessing import text_column
from pipelines.serve.actor_pool import PredictSettings, pool_for_cluster
from pipelines.serve.predict import INFERENCE_ERROR, MARKER, _count, _swap_into_place, _tracking_uri, check_predictions_out
from pipelines.serve.segment_pyfunc import MaskPredictor, Masks, mask_png

MASKS_MARKER = "_msmae_masks.json"


def is_segmenter(ref: str) -> bool:
    """Is ``ref`` (a model URI or a checkpoint folder) a segmenter? Read from the model's metadata / the checkpoint's meta.json."""
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        try:
            return (mlflow.models.get_model_info(ref).metadata or {}).get("task") == "segmentation"
        except Exception:  # noqa: BLE001 - no such model: the classifier's loading says so, in its words
            return False
    try:
        return json.loads((Path(ref) / "meta.json").read_text()).get("stage") == "segment"
    except (OSError, ValueError):
        return False


def load_predictor(ref: str) -> MaskPredictor:
    """The segmenter of a registered model URI, or of a ``msmae segment`` checkpoint folder (its run's threshold and preprocessing)."""
    if ref.startswith(("models:/", "runs:/")):
        from pipelines.serve import segment_pyfunc
        from pipelines.serve.registry import registered_weights

        return segment_pyfunc.predictor_from_state(registered_weights(ref, segment_pyfunc.WEIGHTS_ARTIFACT))
    from pipelines import checkpoint
    from pipelines.data.preprocessing import Preprocessing

    model = checkpoint.load_segmenter(ref)
    meta = json.loads((Path(ref) / checkpoint.META_FILE).read_text())
    inference = checkpoint.read_inference(ref)
    prep = Preprocessing.from_dict({"img_size": model.preset.img_size, **inference.get("preprocessing", {})})
    return MaskPredictor(model, prep, float(meta.get("config", {}).get("segment", {}).get("threshold", 0.5)))


class MaskBatchScorer:
    """A Ray Data callable class, one per actor: decode each listed file, segment the batch, one row per file."""

    def __init__(self, model_ref: str, tracking_uri: str | None, max_file_bytes: int) -> None:
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        self.predictor = load_predictor(model_ref)
        self.max_file_bytes = max_file_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        paths = batch["path"]
        reason, detail = text_column(batch["problem"]), text_column(batch["detail"])
        sources: list = []
        for k, path in enumerate(paths):
            if reason[k] is not None:  # the listing already knows why (broken link, FIFO, loop)
                sources.append(images.Rejected(reason[k], detail[k]))
                continue
            try:
                too_large = os.stat(path).st_size > self.max_file_bytes
            except OSError as e:
                sources.append(images.Rejected(images.UNREADABLE, f"{type(e).__name__}: {e}"))
                continue
            sources.append(images.Rejected(images.TOO_LARGE, f"file is above predict's limit of {self.max_file_bytes} bytes")
                           if too_large else str(path))
        try:
            result = self.predictor.predict(sources)
        except Exception:  # noqa: BLE001 - find the file(s) at fault: each alone, the others still get their masks
            result = Masks([], [], [])
            for source in sources:
                try:
                    one = self.predictor.predict([source])
                except Exception as e:  # noqa: BLE001 - that file's row says why
                    one = Masks([None], [INFERENCE_ERROR], [f"{type(e).__name__}: {e}"])
                result.masks += one.masks
                result.reason += one.reason
                result.detail += one.detail
        masks = result.masks
        return pa.table({
            "path": pa.array([str(p) for p in paths], pa.string()),
            "ok": pa.array([m is not None for m in masks], pa.bool_()),
            "reason": pa.array(list(result.reason), pa.string()),
            "detail": pa.array(list(result.detail), pa.string()),
            "height": pa.array([m.shape[0] if m is not None else None for m in masks], pa.int64()),
            "width": pa.array([m.shape[1] if m is not None else None for m in masks], pa.int64()),
            "lesion_fraction": pa.array([float(m.mean()) if m is not None else None for m in masks], pa.float64()),
            "mask_png": pa.array([mask_png(m) if m is not None else None for m in masks], pa.binary()),
        })


def predict_masks(model_ref: str, input_dir: Path, out: Path, settings: PredictSettings = PredictSettings(),
                  masks_dir: Path | None = None) -> dict:
    """Segment every file under ``input_dir`` into Parquet shards in ``out`` (and PNG masks in ``masks_dir``)."""
    from pipelines.data.folder_datasource import FolderListing
    from pipelines.local_ray import ensure_ray

    listing = FolderListing(input_dir)
    if not listing.names:
        raise FileNotFoundError(f"--data {input_dir} holds no files")
    check_predictions_out(out)
    load_predictor(model_ref)  # a wrong --model fails here, before Ray starts
    tracking_uri = _tracking_uri(model_ref)
    ensure_ray()
    pool = pool_for_cluster(settings)
    ds = ray.data.read_datasource(listing).map_batches(
        MaskBatchScorer, fn_constructor_args=(model_ref, tracking_uri, settings.max_file_bytes),
        batch_size=settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.gpus_per_actor, num_cpus=pool.cpus_per_actor, udf_modifying_row_count=False,
    )
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    masks_staging = masks_dir.parent / f".{masks_dir.name}.tmp-{os.getpid()}" if masks_dir is not None else None
    try:
        ds.write_parquet(str(staging), min_rows_per_file=settings.rows_per_file)
        summary = _count(staging)
        if masks_staging is not None:
            summary["masks_written"] = write_mask_files(staging, masks_staging, Path(os.path.abspath(input_dir)))
            (masks_staging / MASKS_MARKER).write_text(json.dumps({"predictions": str(out), "model": model_ref}, indent=2))
        summary.update(out=str(out), model=model_ref, input=str(input_dir), task="segmentation", pool=asdict(pool),
                       shards=sum(1 for p in staging.iterdir() if p.suffix == ".parquet"))
        (staging / MARKER).write_text(json.dumps(summary, indent=2))
        if masks_staging is not None:
            _swap_into_place(masks_staging, masks_dir)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if masks_staging is not None:
            shutil.rmtree(masks_staging, ignore_errors=True)
    return summary


def write_mask_files(shards: Path, dest: Path, input_root: Path) -> int:
    """Each ok row's mask as ``dest/<path under input_root>.png``, read from the shards one batch at a time."""
    import pyarrow.dataset as pads

    from pipelines.serve.heatmap_figures import heatmap_path

    dest.mkdir(parents=True, exist_ok=True)
    written = 0
    for batch in pads.dataset(str(shards), format="parquet").to_batches(columns=["path", "ok", "mask_png"]):
        for path, ok, png in zip(*(batch.column(c).to_pylist() for c in ("path", "ok", "mask_png"))):
            if ok:
                target = Path(f"{heatmap_path(dest, input_root, path)}.png")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(png)
                written += 1
    return written
