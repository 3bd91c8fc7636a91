"""The end of a training run: the chosen model evaluated on whole images, calibrated, figures, test once, registered.

Shared by ``msmae run`` and by a sweep, which does this once for its best trial. Calibration:
a temperature is fitted on validation (``pipelines.serve.calibration``) and stored with the model
(the checkpoint's ``inference.json`` and the registered model), and every report gives the
expected calibration error before and after it, on validation and test, with a reliability plot.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msmae
from pipelines import checkpoint, tracking
from pipelines.config import RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve import calibration, model_card, registry
from pipelines.serve.contamination import SeenImages
from pipelines.serve.evaluate import calibrated_report, evaluate_split, format_report


@dataclass
class FinalReport:
    version: str
    champion: bool
    val: object  # msmae.ClassificationReport (temperature-scaled; extra: ece, ece_uncalibrated, temperature)
    test: object | None
    temperature: float = 1.0


def named_scalars(report, class_names: list[str], prefix: str) -> dict[str, float]:
    """A report's scalar metrics with per-class AUC under the class's name (``auc_glioma``), not its index."""
    out = report.scalars(prefix)
    for i, name in enumerate(class_names):
        out[f"{prefix}auc_{metric_safe(name)}"] = out.pop(f"{prefix}auc_{i}")
    return out


def metric_safe(name: str) -> str:
    """A class name as MLflow accepts it in a metric key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def selected_epoch(best_dir: str) -> int:
    """The fine-tuning epoch the chosen checkpoint was written at (its ``meta.json``)."""
    meta = json.loads((Path(best_dir) / checkpoint.META_FILE).read_text())
    return int(meta.get("metrics", {}).get("epoch", 0))


def evaluate_and_register(
    best_dir: str, pretrain_checkpoint: str | None, dataset: IngestedDataset, cfg: RunConfig, log: Callable[[str], None],
    version_tags: dict[str, str] | None = None,
) -> FinalReport:
    """The chosen fine-tuning checkpoint → calibration, final report, figures, test once, registry (in the active MLflow run)."""
    model, names = checkpoint.load_classifier(best_dir)
    epoch = selected_epoch(best_dir)
    _, raw_val, val_labels = evaluate_split(model, dataset, "val")
    temperature = calibration.fit_temperature(raw_val.numpy(), val_labels.numpy())
    val, val_probs, _ = calibrated_report(raw_val, val_labels, len(names), temperature)
    log(format_report(val, names, f"validation (model chosen on validation {cfg.checkpoint.metric}, fine-tuning epoch {epoch})"))
    cal = {"temperature": temperature, "ece_val_before": val.extra["ece_uncalibrated"], "ece_val_after": val.extra["ece"]}
    test = None
    if dataset.split_size("test"):
        test, _, _ = evaluate_split(model, dataset, "test", temperature=temperature)  # once, at the end
        log(format_report(test, names, "test (evaluated once, after selection)"))
        cal.update(ece_test_before=test.extra["ece_uncalibrated"], ece_test_after=test.extra["ece"])
    log(f"calibration: temperature {temperature:.3f} fitted on validation; ECE validation {cal['ece_val_before']:.4f} -> "
        f"{cal['ece_val_after']:.4f}" + (f", test {cal['ece_test_before']:.4f} -> {cal['ece_test_after']:.4f}" if test else ""))

    prep = Preprocessing(img_size=model.preset.img_size, mode=dataset.summary.get("mode", "RGB"),
                         max_side=(dataset.summary.get("options") or {}).get("max_side"))
    checkpoint.write_inference(best_dir, temperature=temperature, preprocessing=prep.to_dict(), calibration=cal)
    seen = SeenImages.from_dataset(dataset)  # what the model was trained and chosen on: carried for the contamination check
    if seen is not None:
        checkpoint.write_seen(best_dir, seen.to_state())
    tracking.log_dataset_input(dataset)
    tracking.log_report(named_scalars(val, names, "final_val/"), {"class_names": names, **val.__dict__}, "final_val_report.json", step=epoch)
    if test is not None:
        tracking.log_report(named_scalars(test, names, "final_test/"), {"class_names": names, **test.__dict__}, "final_test_report.json", step=epoch)
    figs = figures(model, pretrain_checkpoint, dataset, cfg, names, val, val_probs, val_labels)
    figs["plots/reliability.png"] = reliability_plot(raw_val.numpy(), val_probs.numpy(), val_labels.numpy(), temperature)
    tracking.log_figures(figs)

    card = model_card.render(model_card.CardFacts(
        model_name=cfg.tracking.model_name, class_names=names, dataset_path=str(dataset.path), dataset_summary=dataset.summary,
        val=val, test=test, calibration=cal, selection_metric=cfg.checkpoint.metric, selected_epoch=epoch,
        config=cfg.public_dump(), preset=msmae.preset_dict(model.preset), preprocessing=prep.to_dict(),
        run_id=tracking.active_run_id(), git_commit=tracking.git_commit(),
    ))
    tracking.log_text(card, "model_card.md")
    version, champion = registry.register_model(registry.ModelToRegister(
        model=model, class_names=names, temperature=temperature, preprocessing=prep,
        selection_metric=cfg.checkpoint.metric, selection_value=getattr(val, cfg.checkpoint.metric.removeprefix("val_")),
        dataset_fingerprint=dataset.fingerprint, step=epoch, version_description=card,
        model_description=model_card.model_description(), tags=version_tags or {}, seen=seen,
    ), cfg.tracking.model_name)
    return FinalReport(version, champion, val, test, temperature)


def reliability_plot(raw, calibrated, labels, temperature: float):
    """Validation reliability before and after temperature scaling."""
    from pipelines.train import plots

    return plots.reliability_figure(
        {"uncalibrated": calibration.reliability(raw, labels), f"temperature {temperature:.2f}": calibration.reliability(calibrated, labels)},
        "validation reliability (top label, 15 bins)",
    )


def images_of_every_class(stream, num_classes: int, per_class: int = 2, limit: int = 12):
    """Up to ``per_class`` validation images of each class (at most ``limit``), in class order, and their
    lesion masks (None for a dataset without masks; then only images that have one are picked): the
    shards are written class by class, so the first few images would all be one class."""
    import torch

    picked: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {c: [] for c in range(num_classes)}
    with_masks = False
    for batch in stream.iter_torch_batches(batch_size=64):
        with_masks = "mask" in batch
        for k, label in enumerate(batch["label"].tolist()):
            if len(picked[label]) < per_class and (not with_masks or bool(batch["has_mask"][k])):
                picked[label].append((batch["image"][k], batch["mask"][k] if with_masks else None))
        if all(len(v) == per_class for v in picked.values()):
            break
    chosen = [(pair, c) for c in range(num_classes) for pair in picked[c]][:limit]
    masks = torch.stack([p[1] for p, _ in chosen]).bool() if with_masks else None
    return torch.stack([p[0] for p, _ in chosen]), torch.tensor([c for _, c in chosen]), masks


def figures(model, pretrain_checkpoint: str | None, dataset: IngestedDataset, cfg: RunConfig, names: list[str], report, probs, labels) -> dict:
    """Confusion matrix, ROC curves, attention overlays and masked reconstructions on validation images."""
    import torch

    from pipelines.train import plots
    from pipelines.data.streams import eval_stream

    out = {
        "plots/confusion_matrix.png": plots.confusion_figure(report.confusion, names),
        "plots/roc_curves.png": plots.roc_figure(probs, labels, names, report.per_class_auc),
    }
    images, sample_labels, masks = images_of_every_class(eval_stream(dataset, "val", model.preset.img_size), len(names))
    with torch.no_grad():
        predicted = model.cpu().eval()(images).argmax(-1)
    out["plots/attention_overlays.png"] = plots.attention_figure(
        model.cpu(), images, [names[int(i)] for i in sample_labels], [names[int(i)] for i in predicted],
        masks=masks, source=cfg.finetune.masking.map_source,
    )
    if pretrain_checkpoint is not None:  # fine-tuning from scratch has no decoder to show
        masking = cfg.pretrain.masking
        pretrain = checkpoint.load_pretrain_model(pretrain_checkpoint)
        out["plots/reconstructions.png"] = plots.reconstruction_figure(
            pretrain, images, masking.mask_ratio, masking.throw_ratio, uniform=masking.strategy == "uniform",
        )
    return out
