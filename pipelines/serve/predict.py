"""``msmae predict``: Ray Data batch inference over a folder tree, written by Ray Data as Parquet shards.

The pipeline, every stage streaming (nothing is collected on the driver):

    FolderListing (read tasks: the tree walked where the CPUs are)
      → load_for_predict (CPU tasks: decode as ingest does, resize, uint8 pixels)
      → PredictBatchScorer (an actor pool: one model per actor, on a GPU each when the cluster has them)
      → write_parquet (shards into a staging folder, renamed into place when complete)

While it runs, one progress line (files done of the folder's count, files/s, ETA): the scoring
actors count their rows into a counter actor that the driver polls (``pipelines.serve.job_progress``).
With ``--heatmaps``, the actors write each image's map and the driver then draws the figures on
one colour scale for the job (``pipelines.serve.heatmap_figures``).

Every file under the folder yields exactly one row, whatever it is: an image gets its class
and probabilities; anything else (not an image, a broken or looping symlink, a FIFO, a
decompression bomb, a file over the size limit, a truncated file, any exception while decoding
or scoring it) gets ``ok = false`` with the ``reason`` ingest would quarantine it for (or
``inference_error``) and a ``detail``, and null probabilities. One bad file never fails the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch

from pipelines.outputs import OutputPathError, check_output_dir
from pipelines.serve.actor_pool import PredictSettings, pool_for_cluster
from pipelines.data.preprocessing import load_for_predict, text_column
from pipelines.data.transforms import normalise_batch

INFERENCE_ERROR = "inference_error"  # the file decoded, but scoring it raised (the detail says what)
MARKER = "_msmae_predict.json"  # a finished predictions folder: its summary; pyarrow and Ray skip "_" files
DECODE_TASK_MEMORY = 256 << 20  # bytes a decode task reserves besides its batch's pixels


class PredictBatchScorer:
    """A Ray Data callable class, one per actor: the model loaded once, then one batch at a time.

    ``score`` is the per-batch model call (normalised pixels → probabilities); hooks that change
    what a batch yields (temperature scaling, heatmaps) belong there or in ``__call__``.
    """

    def __init__(self, model_ref: str, tracking_uri: str | None, heatmaps: tuple[str, str] | None = None, counter=None) -> None:
        import mlflow

        from pipelines.serve.loading import load

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)  # this actor is another process than the driver
        loaded = load(model_ref)
        self.class_names, self.temperature = loaded.class_names, loaded.temperature  # fitted on validation (issue 17)
        self.seen = loaded.seen  # the training and validation images' fingerprints (None: a model from before them)
        self.heatmaps = heatmaps  # (input folder, heatmaps folder) for --heatmaps
        self.counter = counter  # pipelines.serve.job_progress.RowCounter: the driver's progress line counts our rows
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # Ray hides GPUs it did not assign
        self.model = loaded.model.to(self.device).eval()

    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities ``[B, C]`` of normalised images ``[B, 3, S, S]`` on the model's device
        (the registered model's own function: ``msmae predict`` and the served model give the same numbers)."""
        from pipelines.serve.explain import class_probability

        return class_probability(self.model, pixels, self.temperature)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.asarray(batch["ok"], dtype=bool).copy()
        reason, detail = text_column(batch["reason"]), text_column(batch["detail"])
        probs = np.full((len(ok), len(self.class_names)), np.nan, dtype=np.float32)
        rows = np.flatnonzero(ok)
        if len(rows):
            pixels = torch.from_numpy(normalise_batch(np.asarray(batch["pixels"])[rows]))
            try:
                probs[rows] = self._probs(pixels)
            except Exception:  # noqa: BLE001 - find the image(s) at fault: each alone, the others still scored
                for k, row in enumerate(rows):
                    try:
                        probs[row] = self._probs(pixels[k:k + 1])[0]
                    except Exception as e:  # noqa: BLE001 - that image's row says why
                        ok[row], reason[row], detail[row] = False, INFERENCE_ERROR, f"{type(e).__name__}: {e}"
            if self.heatmaps:
                still = ok[rows]
                self._write_heatmaps(batch, rows[still], pixels[torch.from_numpy(still)])
        seen = np.full(len(ok), None, dtype=object)
        if self.seen is not None and ok.any():
            seen[ok] = self.seen.flags(np.asarray(batch["fingerprint"])[ok])
        if self.counter is not None:
            self.counter.add.remote(len(ok))  # fire and forget: progress never holds up scoring
        return result_table(batch["path"], ok, reason, detail, probs, self.class_names, seen)

    def _write_heatmaps(self, batch: dict[str, np.ndarray], rows: np.ndarray, pixels: torch.Tensor) -> None:
        """``--heatmaps DIR``: per image, ``DIR/<path under --input>.npy`` (the occlusion map, patch rows x columns,
        from ``pipelines.serve.explain``; the batch's images share forward passes). The figures are drawn at the end,
        on one colour scale for the whole job (``pipelines.serve.heatmap_figures.draw_all``)."""
        from pipelines.serve import explain
        from pipelines.serve.heatmap_figures import heatmap_path

        if not len(rows):
            return
        drops, _ = explain.occlusion_maps(self.model, pixels.to(self.device), self.temperature)
        grids = explain.as_grid(drops.cpu(), self.model.preset)
        root, out = Path(self.heatmaps[0]), Path(self.heatmaps[1])
        for k, row in enumerate(rows):
            dest = heatmap_path(out, root, str(batch["path"][row]))
            dest.parent.mkdir(parents=True, exist_ok=True)
            np.save(f"{dest}.npy", grids[k])

    def _probs(self, pixels: torch.Tensor) -> np.ndarray:
        return self.score(pixels.to(self.device, non_blocking=True)).float().cpu().numpy()


def result_table(path, ok: np.ndarray, reason, detail, probs: np.ndarray, class_names: list[str], seen=None) -> pa.Table:
    """The row contract: path, predicted_class, ok, reason, detail, seen_in_training, prob_<class> (null where ok is false;
    seen_in_training null where not ok, or when the model carries no fingerprints of its training images)."""
    names = np.asarray(class_names, dtype=object)
    predicted = np.where(ok, names[np.nan_to_num(probs, nan=0.0).argmax(1)], None)
    return pa.table({
        "path": pa.array(list(path), pa.string()),
        "predicted_class": pa.array(list(predicted), pa.string()),
        "ok": pa.array(ok, pa.bool_()),
        "reason": pa.array(list(reason), pa.string()),
        "detail": pa.array(list(detail), pa.string()),
        "seen_in_training": pa.array(list(seen) if seen is not None else [None] * len(ok), pa.bool_()),
        **{f"prob_{name}": pa.array(probs[:, c].astype(np.float64), pa.float64(), mask=~ok) for c, name in enumerate(class_names)},
    })


def check_predictions_out(out: Path, option: str = "--out") -> None:
    """Before any work: ``out`` is a new folder, an empty one, or an earlier predictions folder (replaced whole at the end)."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{option} {out} is a file; predict writes a folder of Parquet shards, give a folder path")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise OutputPathError(f"{option} {out} is a folder holding other files; give a new folder (predict writes Parquet shards there)")
    check_output_dir(out, option)


HEATMAPS_MARKER = "_msmae_heatmaps.json"  # a finished heatmaps folder (so a later run may replace it whole)


def check_heatmaps_out(heatmaps: Path, input_dir: Path, option: str = "--heatmaps") -> None:
    """Before any work, as for ``--out``: a new or empty folder, or an earlier heatmaps folder (replaced whole),
    never the input folder or anything overlapping it — maps written there would land among the user's images."""
    if heatmaps.exists() and not heatmaps.is_dir():
        raise OutputPathError(f"{option} {heatmaps} is a file; give a folder")
    a, b = heatmaps.resolve(), input_dir.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise OutputPathError(f"{option} {heatmaps} overlaps --input {input_dir}; give a folder outside the images")
    if heatmaps.is_dir() and any(heatmaps.iterdir()) and not (heatmaps / HEATMAPS_MARKER).is_file() and not (heatmaps / "_msmae_masks.json").is_file():
        raise OutputPathError(f"{option} {heatmaps} is a folder holding other files; give a new folder (predict writes a map per image there)")
    check_output_dir(heatmaps, option)


def predict_folder(model_ref: str, input_dir: Path, out: Path, settings: PredictSettings = PredictSettings(),
                   heatmaps: Path | None = None) -> dict:
    """Predict every file under ``input_dir`` (recursively, folder links followed) into Parquet shards in ``out``.

    The model is loaded and the folder's top level listed before Ray starts, so a wrong
    ``--model`` or an empty folder fails in seconds. Shards are written into a staging folder
    beside ``out`` and renamed into place when the job is complete: ``out`` holds a whole
    result or what it held before. Returns the summary (counted from the shards, streamed).
    ``heatmaps``: a folder that gets each image's patch-occlusion map (``PredictBatchScorer._write_heatmaps``);
    on a multi-node cluster it must be storage every node writes to.
    """
    from pipelines.serve.loading import load
    from pipelines.data.folder_datasource import FolderListing
    from pipelines.local_ray import ensure_ray

    if not input_dir.is_dir():
        raise FileNotFoundError(f"--input {input_dir} is not a folder")
    listing = FolderListing(input_dir)
    if not listing.names:
        raise FileNotFoundError(f"--input {input_dir} holds no files")
    check_predictions_out(out)
    if heatmaps is not None:
        check_heatmaps_out(heatmaps, input_dir)
    loaded = load(model_ref)
    class_names, preprocessing = loaded.class_names, loaded.preprocessing  # size, mode, max-side: carried by the model
    img_size = preprocessing.img_size
    del loaded
    tracking_uri = _tracking_uri(model_ref)
    # the maps are written beside --heatmaps and swapped in with the predictions: nothing there is overwritten mid-way
    maps_staging = heatmaps.parent / f".{heatmaps.name}.tmp-{os.getpid()}" if heatmaps is not None else None
    ensure_ray()
    from pipelines.progress import Progress
    from pipelines.serve.job_progress import RowCounter, watched

    pool = pool_for_cluster(settings)
    counter = RowCounter.remote()
    ds = ray.data.read_datasource(listing).map_batches(
        load_for_predict, fn_kwargs={"preprocessing": preprocessing.to_dict(), "max_file_bytes": settings.max_file_bytes},
        batch_size=settings.batch_size, batch_format="numpy", udf_modifying_row_count=False,
        # What a decode task holds: one source image at a time plus the batch's pixels. Declaring it also
        # keeps decoding its own operator: Ray fuses a task map into the actor map after it when their
        # remote arguments match, and each scoring actor would then decode its batches one after the
        # other instead of CPU tasks decoding in parallel beside it.
        memory=DECODE_TASK_MEMORY + settings.batch_size * img_size * img_size * 3,
    ).map_batches(
        PredictBatchScorer, fn_constructor_args=(model_ref, tracking_uri, (os.path.abspath(input_dir), os.path.abspath(maps_staging)) if heatmaps else None,
                                                 counter),
        batch_size=settings.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        num_gpus=pool.gpus_per_actor, num_cpus=pool.cpus_per_actor, udf_modifying_row_count=False,
    )
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        # one progress line for the whole job: files scored (rows written), images/s, ETA once the folder is counted
        progress = Progress("predict" + (" with heatmaps" if heatmaps else ""), unit="files")
        with watched(progress, counter, listing.count):
            ds.write_parquet(str(staging), min_rows_per_file=settings.rows_per_file)
            summary = _count(staging)
            progress.update_to(summary["images"])  # the closing line counts the shards' rows, not the last poll
        if not summary["images"]:
            raise FileNotFoundError(f"--input {input_dir} holds no files (only empty folders)")
        if maps_staging is not None:
            from pipelines.serve.heatmap_figures import draw_all

            summary["heatmaps"] = draw_all(staging, Path(os.path.abspath(maps_staging)), Path(os.path.abspath(input_dir)), class_names)
        summary.update(out=str(out), model=model_ref, input=str(input_dir), class_names=class_names, pool=asdict(pool),
                       shards=sum(1 for p in staging.iterdir() if p.suffix == ".parquet"))
        (staging / MARKER).write_text(json.dumps(summary, indent=2))
        if maps_staging is not None:
            maps_staging.mkdir(parents=True, exist_ok=True)
            (maps_staging / HEATMAPS_MARKER).write_text(json.dumps({"predictions": str(out), "model": model_ref}, indent=2))
            _swap_into_place(maps_staging, heatmaps)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if maps_staging is not None:
            shutil.rmtree(maps_staging, ignore_errors=True)
    return summary


def _tracking_uri(model_ref: str) -> str | None:
    """The driver's MLflow tracking URI, for actors to load a ``models:/`` or ``runs:/`` model from."""
    if not model_ref.startswith(("models:/", "runs:/")):
        return None
    import mlflow

    return mlflow.get_tracking_uri()


def _count(folder: Path) -> dict:
    """Rows, predicted, and failures per reason, read from the shards' ok/reason columns one batch at a time."""
    import pyarrow.dataset as pads

    reasons: Counter[str] = Counter()
    rows = 0
    if folder.is_dir():
        for batch in pads.dataset(str(folder), format="parquet").to_batches(columns=["ok", "reason"]):
            rows += batch.num_rows
            failed = batch.filter(pc.invert(batch.column("ok")))
            reasons.update(failed.column("reason").to_pylist())
    return {"images": rows, "unreadable": sum(reasons.values()), "reasons": dict(reasons)}


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out``; an earlier predictions folder there is replaced whole."""
    aside = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        if aside.exists():
            os.replace(aside, out)
        raise
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(aside)
