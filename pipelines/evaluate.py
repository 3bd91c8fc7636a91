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


def evaluate_split(
    model: msmae.MSMAEClassifier, data_dir: Path, split: str, img_size: int, batch_size: int = 64
) -> msmae.ClassificationReport:
    """Evaluate on every image of ``split`` (streamed by Ray Data, resize only, all tokens)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    batches = (
        (b["image"], b["label"])
        for b in eval_stream(data_dir, split, img_size).iter_torch_batches(batch_size=batch_size, device=device)
    )
    report, _, _ = msmae.evaluate(model, batches, model.num_classes)
    return report


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
