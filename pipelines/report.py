"""The end of a training run: the chosen model evaluated on whole images, figures, test once, registered.

Shared by ``msmae run`` and by a sweep, which does this once for its best trial.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines import checkpoint, tracking
from pipelines.config import RunConfig
from pipelines.dataset import IngestedDataset
from pipelines.evaluate import evaluate_split, format_report


@dataclass
class FinalReport:
    version: str
    champion: bool
    val: object  # msmae.ClassificationReport
    test: object | None


def evaluate_and_register(
    best_dir: str, pretrain_checkpoint: str | None, dataset: IngestedDataset, cfg: RunConfig, log: Callable[[str], None],
    version_tags: dict[str, str] | None = None,
) -> FinalReport:
    """The chosen fine-tuning checkpoint → final report, figures, test once, registry (in the active MLflow run)."""
    import torch

    model, names = checkpoint.load_classifier(best_dir)
    val, val_probs, val_labels = evaluate_split(model, dataset.path, "val")
    log(format_report(val, names, f"validation (model chosen on validation {cfg.checkpoint.metric})"))
    tracking.log_report(val.scalars("final_val/"), {"class_names": names, **val.__dict__}, "final_val_report.json")
    tracking.log_figures(figures(model, pretrain_checkpoint, dataset.path, cfg, names, val, val_probs, val_labels))
    test = None
    if dataset.split_size("test"):
        test, _, _ = evaluate_split(model, dataset.path, "test")  # once, at the end
        log(format_report(test, names, "test (evaluated once, after selection)"))
        tracking.log_report(test.scalars("final_test/"))
    size = model.preset.img_size
    version, champion = tracking.register_model(
        model, cfg.tracking.model_name, names, cfg.checkpoint.metric,
        getattr(val, cfg.checkpoint.metric.removeprefix("val_")), dataset.fingerprint, torch.zeros(1, 3, size, size), version_tags,
    )
    return FinalReport(version, champion, val, test)


def figures(model, pretrain_checkpoint: str | None, data_dir: Path, cfg: RunConfig, names: list[str], report, probs, labels) -> dict:
    """Confusion matrix, ROC curves, attention overlays and masked reconstructions on validation images."""
    import torch

    from pipelines import plots
    from pipelines.data import eval_stream

    out = {
        "plots/confusion_matrix.png": plots.confusion_figure(report.confusion, names),
        "plots/roc_curves.png": plots.roc_figure(probs, labels, names, report.per_class_auc),
    }
    sample = eval_stream(data_dir, "val", model.preset.img_size).take_batch(8)
    images = torch.as_tensor(sample["image"])
    titles = [names[int(label)] for label in sample["label"]]
    out["plots/attention_overlays.png"] = plots.attention_figure(model.cpu(), images, titles)
    if pretrain_checkpoint is not None:  # fine-tuning from scratch has no decoder to show
        masking = cfg.pretrain.masking
        pretrain = checkpoint.load_pretrain_model(pretrain_checkpoint)
        out["plots/reconstructions.png"] = plots.reconstruction_figure(pretrain, images, masking.mask_ratio, masking.throw_ratio)
    return out
