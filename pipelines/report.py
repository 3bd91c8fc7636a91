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


def images_of_every_class(stream, num_classes: int, per_class: int = 2, limit: int = 12):
    """Up to ``per_class`` validation images of each class (at most ``limit``), in class order:
    the shards are written class by class, so the first few images would all be one class."""
    import torch

    picked: dict[int, list[torch.Tensor]] = {c: [] for c in range(num_classes)}
    for batch in stream.iter_torch_batches(batch_size=64):
        for image, label in zip(batch["image"], batch["label"].tolist()):
            if len(picked[label]) < per_class:
                picked[label].append(image)
        if all(len(v) == per_class for v in picked.values()):
            break
    chosen = [(image, c) for c in range(num_classes) for image in picked[c]][:limit]
    return torch.stack([i for i, _ in chosen]), torch.tensor([c for _, c in chosen])


def figures(model, pretrain_checkpoint: str | None, data_dir: Path, cfg: RunConfig, names: list[str], report, probs, labels) -> dict:
    """Confusion matrix, ROC curves, attention overlays and masked reconstructions on validation images."""
    import torch

    from pipelines import plots
    from pipelines.data import eval_stream

    out = {
        "plots/confusion_matrix.png": plots.confusion_figure(report.confusion, names),
        "plots/roc_curves.png": plots.roc_figure(probs, labels, names, report.per_class_auc),
    }
    images, sample_labels = images_of_every_class(eval_stream(data_dir, "val", model.preset.img_size), len(names))
    with torch.no_grad():
        predicted = model.cpu().eval()(images).argmax(-1)
    out["plots/attention_overlays.png"] = plots.attention_figure(
        model.cpu(), images, [names[int(i)] for i in sample_labels], [names[int(i)] for i in predicted],
    )
    if pretrain_checkpoint is not None:  # fine-tuning from scratch has no decoder to show
        masking = cfg.pretrain.masking
        pretrain = checkpoint.load_pretrain_model(pretrain_checkpoint)
        out["plots/reconstructions.png"] = plots.reconstruction_figure(
            pretrain, images, masking.mask_ratio, masking.throw_ratio, uniform=masking.strategy == "uniform",
        )
    return out
