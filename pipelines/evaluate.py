"""Full-image evaluation of a fine-tuned model on an ingested split, and the printed table."""

from __future__ import annotations

from pathlib import Path

import torch

import msmae
from pipelines.data import eval_stream
from pipelines.worker import STATE_FILE


def load_classifier(checkpoint_dir: str | Path) -> tuple[msmae.MSMAEClassifier, list[str]]:
    """The classifier stored in a fine-tuning checkpoint, and its class names."""
    state = torch.load(Path(checkpoint_dir) / STATE_FILE, map_location="cpu", weights_only=False)
    preset = msmae.ViTPreset(**state["preset"])
    model = msmae.build_classifier(preset, state["num_classes"], drop_path_rate=0.0)
    model.load_state_dict(state["model"])
    return model.eval(), state["class_names"]


def load_model(ref: str) -> tuple[msmae.MSMAEClassifier, list[str]]:
    """A classifier from an MLflow model URI (``models:/NAME@champion``, ``runs:/…``) or a checkpoint folder."""
    if ref.startswith(("models:/", "runs:/")):
        import mlflow

        info = mlflow.models.get_model_info(ref)
        names = list((info.metadata or {}).get("class_names") or [])
        model = mlflow.pytorch.load_model(ref, map_location="cpu")
        if not names:
            raise ValueError(f"{ref} carries no class_names metadata; was it registered by msmae?")
        return model.eval(), names
    if not (Path(ref) / STATE_FILE).is_file():
        raise FileNotFoundError(f"{ref} is neither an MLflow model URI (models:/NAME@alias) nor a checkpoint folder with {STATE_FILE}")
    return load_classifier(ref)


def evaluate_split(
    model: msmae.MSMAEClassifier, data_dir: Path, split: str, img_size: int, batch_size: int = 64
) -> tuple[msmae.ClassificationReport, torch.Tensor, torch.Tensor]:
    """Evaluate on every image of ``split`` (streamed by Ray Data, resize only, all tokens).

    Returns the report and the probabilities and labels behind it (for plots)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    batches = (
        (b["image"], b["label"])
        for b in eval_stream(data_dir, split, img_size).iter_torch_batches(batch_size=batch_size, device=device)
    )
    return msmae.evaluate(model, batches, model.num_classes)


def format_report(report: msmae.ClassificationReport, class_names: list[str], title: str) -> str:
    """A plain-text metrics table with per-class AUC and the confusion matrix."""
    lines = [
        title,
        f"  images             {report.num_samples}",
        f"  accuracy           {report.accuracy:.4f}",
        f"  balanced accuracy  {report.balanced_accuracy:.4f}",
        f"  macro-F1           {report.macro_f1:.4f}",
        f"  macro ROC AUC      {report.macro_auc:.4f}",
        "  per class          " + "  ".join(f"{n}: AUC {a:.3f}" for n, a in zip(class_names, report.per_class_auc)),
        "  confusion (rows = true, columns = predicted; " + ", ".join(class_names) + ")",
    ]
    width = max(len(n) for n in class_names)
    for name, row in zip(class_names, report.confusion):
        lines.append(f"    {name:>{width}}  " + " ".join(f"{v:5d}" for v in row))
    return "\n".join(lines)


def evaluate_data(model_ref: str, data: Path, split: str, img_size: int, log=print) -> dict:
    """Evaluate on an ingested folder, or on a raw labelled ImageFolder ingested on the fly.

    Classes are matched by name: a raw folder is ingested with the model's class list, so
    images of any other class are quarantined and counted, never silently scored.
    """
    import json
    import tempfile

    from pipelines.ingest import IngestOptions, ingest
    from pipelines.train import ensure_ray, split_size

    model, names = load_model(model_ref)
    if not (data / "dataset.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="msmae-eval-"))
        result = ingest(data, tmp, IngestOptions(val=0.0, test=0.0, classes=names), progress=False, log=lambda _: None)
        log(f"ingested {data}: {result.summary['num_images']} images, {result.summary['quarantined']} quarantined "
            f"(see {tmp / 'quarantine.csv'})")
        data, split = tmp, "train"  # everything lands in one split
    info = json.loads((data / "dataset.json").read_text())
    data_names = [n for n, _ in sorted(info["classes"].items(), key=lambda kv: kv[1])]
    if data_names != names:
        raise ValueError(f"{data} has classes {data_names}, the model {names}; re-ingest with --classes {','.join(names)}")
    splits = [s for s in ("train", "val", "test") if split_size(info, s)] if split == "all" else [split]
    ensure_ray()
    results = {}
    for name in splits:
        if not split_size(info, name):
            raise ValueError(f"split {name!r} of {data} is empty")
        report, _, _ = evaluate_split(model, data, name, img_size)
        log(format_report(report, names, f"{model_ref} on {data} [{name}]"))
        results[name] = {"class_names": names, **report.__dict__}
    return results
