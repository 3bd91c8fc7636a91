"""Full-image evaluation of a fine-tuned model on an ingested split, and the printed table.

The model knows its own image size (its preset travels in the checkpoint and in the
registered model), so nothing here asks the user for it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

import msmae
from pipelines.data.dataset import IngestedDataset
from pipelines.data.streams import eval_stream
from pipelines.serve import calibration
from pipelines.serve.loading import LoadedModel, load


def evaluate_split(
    model: msmae.MSMAEClassifier, dataset: IngestedDataset, split: str, batch_size: int = 64, temperature: float = 1.0,
) -> tuple[msmae.ClassificationReport, torch.Tensor, torch.Tensor]:
    """Evaluate on every image of ``split`` at the model's own size (streamed by Ray Data, resize only, all tokens).

    Returns the report (with its ECE before and after ``temperature``) and the temperature-scaled
    probabilities and labels behind it (for plots)."""
    raw, labels, _ = split_probabilities(model, dataset, split, batch_size)
    return calibrated_report(raw, labels, model.num_classes, temperature)


def split_probabilities(model: msmae.MSMAEClassifier, dataset: IngestedDataset, split: str, batch_size: int = 64,
                        ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Uncalibrated probabilities ``[N, C]``, labels ``[N]`` and each row's dataset ``index`` ``[N]`` (stream order).

    Prints progress (``pipelines.progress``: images done, images/s, ETA), counted as the batches come back."""
    from pipelines.progress import Progress
    from pipelines.serve.actor_pool import cluster_probabilities, score_on_actors

    stream = eval_stream(dataset, split, model.preset.img_size)
    total = dataset.split_size(split)
    with Progress(f"evaluate {split}", total=total) as progress:
        if score_on_actors(total):  # large splits: an actor pool, GPUs of the cluster
            return cluster_probabilities(stream, model, batch_size, progress)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        index: list[np.ndarray] = []

        def batches():
            for b in stream.iter_torch_batches(batch_size=batch_size, device=device):
                index.append(b["index"].cpu().numpy())
                yield b["image"], b["label"]
                progress.update(len(b["label"]))  # after msmae.evaluate scored it

        _, raw, labels = msmae.evaluate(model, batches(), model.num_classes)
    return raw, labels, np.concatenate(index) if index else np.zeros(0, dtype=np.int64)


def calibrated_report(raw: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float,
                      ) -> tuple[msmae.ClassificationReport, torch.Tensor, torch.Tensor]:
    """The report of the temperature-scaled probabilities, with ``ece`` (after), ``ece_uncalibrated`` and ``temperature``
    in its extras; the predicted classes, hence accuracy and the confusion matrix, do not change."""
    probs = torch.from_numpy(calibration.apply_temperature(raw.numpy(), temperature)).float()
    report = msmae.report_from_probs(probs, labels, num_classes)
    report.extra.update(
        ece=calibration.expected_calibration_error(probs.numpy(), labels.numpy()),
        ece_uncalibrated=calibration.expected_calibration_error(raw.numpy(), labels.numpy()),
        temperature=float(temperature),
    )
    return report, probs, labels


def format_report(report: msmae.ClassificationReport, class_names: list[str], title: str) -> str:
    """A plain-text metrics table with per-class AUC and the confusion matrix."""
    lines = [
        title,
        f"  images             {report.num_samples}",
        *(f"  {label:<19}{getattr(report, name):.4f}" for name, label in msmae.HEADLINE_METRICS.items()),
        *([f"  ECE                {report.extra['ece']:.4f} (uncalibrated {report.extra['ece_uncalibrated']:.4f}, "
           f"temperature {report.extra['temperature']:.3f})"] if "ece" in report.extra else []),
        "  per class          " + "  ".join(f"{n}: AUC {a:.3f}" for n, a in zip(class_names, report.per_class_auc)),
        "  confusion (rows = true, columns = predicted; " + ", ".join(class_names) + ")",
    ]
    width = max(len(n) for n in class_names)
    for name, row in zip(class_names, report.confusion):
        lines.append(f"    {name:>{width}}  " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def evaluate_data(model_ref: str, data: Path, split: str, log=print) -> dict:
    """Evaluate on an ingested folder, or on a raw labelled ImageFolder ingested on the fly.

    Classes are matched by name: a raw folder is ingested with the model's class list, so
    images of any other class are quarantined and counted, never silently scored. The raw
    folder's copy lives in a temporary folder removed afterwards; what it quarantined is
    listed in the result (``quarantine``: path, reason, detail), so no file goes unaccounted.
    """
    loaded = load(model_ref)
    names = loaded.class_names
    if IngestedDataset.is_ingested(data):
        return _evaluate_ingested(loaded, model_ref, IngestedDataset.load(data), split, log)
    import tempfile

    import polars as pl

    from pipelines.data.ingest import IngestError, IngestOptions, ingest

    with tempfile.TemporaryDirectory(prefix="msmae-eval-") as tmp:
        out = Path(tmp) / "data"
        try:
            prep = loaded.preprocessing  # decoded as the model's training data was (mode, downscale)
            result = ingest(data, out, IngestOptions(mode=prep.mode, max_side=prep.max_side, val=0.0, test=0.0, classes=names),
                            progress=False, log=lambda _: None)
        except IngestError:
            if not (out / "quarantine.csv").is_file():
                raise
            reasons = dict(Counter(pl.read_csv(out / "quarantine.csv")["reason"].to_list()))
            raise IngestError(f"nothing to evaluate in {data}: every file was quarantined {reasons}; "
                              f"the model's classes are {', '.join(names)}") from None
        quarantine = pl.read_csv(out / "quarantine.csv", infer_schema=False).to_dicts()
        log(f"ingested {data}: {result.summary['num_images']} images, {len(quarantine)} quarantined"
            + (f" {dict(Counter(q['reason'] for q in quarantine))} (listed in the output's 'quarantine')" if quarantine else ""))
        results = _evaluate_ingested(loaded, model_ref, result.dataset, "train", log, shown_as=data)  # everything lands in one split
    results["quarantine"] = quarantine
    return results


def _evaluate_ingested(loaded: LoadedModel, model_ref: str, dataset: IngestedDataset, split: str, log,
                       shown_as: Path | None = None) -> dict:
    """Every requested split checked first (no Ray start for a wrong one), then evaluated at the model's temperature and printed."""
    from pipelines.local_ray import ensure_ray

    names = loaded.class_names
    data = dataset.path
    if dataset.class_names != names:
        raise ValueError(f"{data} has classes {dataset.class_names}, the model {names}; re-ingest with --classes {','.join(names)}")
    splits = dataset.non_empty_splits() if split == "all" else [split]
    for name in splits:
        if not dataset.split_size(name):
            raise ValueError(f"split {name!r} of {shown_as or data} is empty; it has {', '.join(dataset.non_empty_splits())}")
    ensure_ray()
    results = {}
    for name in splits:
        raw, labels, index = split_probabilities(loaded.model, dataset, name)
        report, _, _ = calibrated_report(raw, labels, len(names), loaded.temperature)
        log(format_report(report, names, f"{model_ref} on {shown_as or data} [{name}]"))
        results[name] = {"class_names": names, **report.__dict__, **_contamination(loaded, dataset, name, raw, labels, index, log)}
    return results


def _contamination(loaded: LoadedModel, dataset: IngestedDataset, split: str, raw: torch.Tensor, labels: torch.Tensor,
                   index: np.ndarray, log) -> dict:
    """How many evaluated images are near-copies of images the model was trained or selected on, and the
    metrics on the rest: an outside test set that overlaps the training data shows at a glance."""
    if loaded.seen is None:
        log("contamination check: skipped (the model carries no fingerprints of its training images: trained before them)")
        return {"seen_in_training": None}
    shard_index, fps = dataset.fingerprints((split,))
    if not len(fps):
        log("contamination check: skipped (the data was ingested before fingerprints; re-ingest it)")
        return {"seen_in_training": None}
    row_of = {int(i): k for k, i in enumerate(shard_index)}
    seen = loaded.seen.flags(fps[[row_of[int(i)] for i in index]])
    n_seen, n = int(seen.sum()), len(seen)
    log(f"contamination check: {n_seen} of {n} images are near-copies of images the model was trained or selected on "
        f"(fingerprint similarity >= {loaded.seen.threshold})")
    out: dict = {"seen_in_training": n_seen, "unseen_images": n - n_seen}
    if n_seen and n - n_seen:
        keep = torch.from_numpy(~seen)
        unseen, _, _ = calibrated_report(raw[keep], labels[keep], len(loaded.class_names), loaded.temperature)
        log(format_report(unseen, loaded.class_names, f"  the {n - n_seen} unseen images only [{split}]"))
        out["unseen"] = unseen.__dict__
    return out
