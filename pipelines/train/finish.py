"""The end of a training run: the chosen model evaluated on whole images, calibrated, figures, test once, judged, registered.

Shared by ``msmae run`` and by a sweep, which does this once for its best trial. Calibration:
a temperature is fitted on validation (``pipelines.serve.calibration``) and kept only when it
lowers validation ECE (else T = 1); it is stored with the model (the checkpoint's
``inference.json`` and the registered model), and every report gives the expected calibration
error before and after it, on validation and test, with a reliability plot. Promotion
(``pipelines.serve.promotion``): the quality gate and the comparison with the champion on this
run's validation split decide the alias before the version is registered, so the model card says why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msmae
from pipelines import checkpoint, tracking
from pipelines.config import RunConfig
from pipelines.data.dataset import IngestedDataset
from pipelines.data.preprocessing import Preprocessing
from pipelines.serve import calibration, model_card, promotion, registry
from pipelines.serve.contamination import SeenImages
from pipelines.serve.evaluate import calibrated_report, evaluate_split, format_report, split_probabilities
from pipelines.train.metric_names import metric_safe, named_scalars  # noqa: F401 - metric_safe: imported from here by others


@dataclass
class FinalReport:
    version: str
    champion: bool
    val: object  # msmae.ClassificationReport (temperature-scaled; extra: ece, ece_uncalibrated, temperature)
    test: object | None
    temperature: float = 1.0
    decision: promotion.Decision | None = None  # which alias the version got, and why
    calibration: calibration.TemperatureChoice | None = None
    checkpoint: str | None = None  # the fine-tuning checkpoint folder that was registered
    model_name: str | None = None

    @property
    def alias(self) -> str | None:
        return self.decision.alias if self.decision else None


def selected_epoch(best_dir: str) -> int:
    """The fine-tuning epoch the chosen checkpoint was written at (its ``meta.json``)."""
    meta = json.loads((Path(best_dir) / checkpoint.META_FILE).read_text())
    return int(meta.get("metrics", {}).get("epoch", 0))


def evaluate_and_register(
    best_dir: str, pretrain_checkpoint: str | None, dataset: IngestedDataset, cfg: RunConfig, log: Callable[[str], None],
    version_tags: dict[str, str] | None = None,
) -> FinalReport:
    """The chosen fine-tuning checkpoint → calibration, final report, figures, test once, promotion decision, registry
    (in the active MLflow run). The model name is ``tracking.model_name``, else derived from the dataset."""
    model, names = checkpoint.load_classifier(best_dir)
    epoch = selected_epoch(best_dir)
    raw_val, val_labels, val_index = split_probabilities(model, dataset, "val")
    choice = calibration.choose_temperature(raw_val.numpy(), val_labels.numpy())
    temperature = choice.temperature
    val, val_probs, _ = calibrated_report(raw_val, val_labels, len(names), temperature)
    log(format_report(val, names, f"validation ({val.num_samples} images; model chosen on validation {cfg.checkpoint.metric}, "
                                  f"fine-tuning epoch {epoch})"))
    cal = {"temperature": temperature, "fitted_temperature": choice.fitted, "temperature_applied": choice.applied,
           "ece_val_before": choice.ece_before, "ece_val_after": val.extra["ece"], "ece_val_fitted": choice.ece_fitted}
    test = None
    if dataset.split_size("test"):
        test, _, _ = evaluate_split(model, dataset, "test", temperature=temperature)  # once, at the end
        log(format_report(test, names, f"test ({test.num_samples} images, evaluated once, after selection)"))
        cal.update(ece_test_before=test.extra["ece_uncalibrated"], ece_test_after=test.extra["ece"])
    log(choice.line() + (f"; test ECE {cal['ece_test_before']:.4f} -> {cal['ece_test_after']:.4f}" if test else ""))

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
    figs = figures(model, pretrain_checkpoint, dataset, cfg, names, val, val_probs, val_labels,
                   f"validation, {val.num_samples} images, fine-tuning epoch {epoch} (selected)")
    figs["plots/reliability.png"] = reliability_plot(raw_val.numpy(), val_probs.numpy(), val_labels.numpy(), choice)
    tracking.log_figures(figs)

    model_name = cfg.tracking.model_name or registry.default_name(dataset.summary, dataset.path)
    decision = promotion.judge(model_name, val_probs.numpy(), val_labels.numpy(), val_index, names, dataset.fingerprint,
                               cfg.checkpoint.metric, dataset, dataset.class_counts("train"), log)
    log(f"promotion: {decision.reason}")
    tracking.log_outcome("msmae.promotion", decision.reason, decision.to_dict(), "promotion.json")
    card = model_card.render(model_card.CardFacts(
        model_name=model_name, class_names=names, dataset_path=str(dataset.path), dataset_summary=dataset.summary,
        val=val, test=test, calibration=cal, selection_metric=cfg.checkpoint.metric, selected_epoch=epoch,
        config=cfg.public_dump(), preset=msmae.preset_dict(model.preset), preprocessing=prep.to_dict(),
        run_id=tracking.active_run_id(), git_commit=tracking.git_commit(), promotion=decision,
    ))
    tracking.log_text(card, "model_card.md")
    version = registry.register_model(registry.ModelToRegister(
        model=model, class_names=names, temperature=temperature, preprocessing=prep,
        selection_metric=cfg.checkpoint.metric, selection_value=getattr(val, cfg.checkpoint.metric.removeprefix("val_")),
        dataset_fingerprint=dataset.fingerprint, step=epoch, version_description=card,
        model_description=model_card.model_description(),
        tags={"promotion": decision.reason[:5000], **(version_tags or {})}, seen=seen,
    ), model_name, decision.alias)
    return FinalReport(version, decision.promoted, val, test, temperature, decision, choice, best_dir, model_name)


def reliability_plot(raw, calibrated, labels, choice: calibration.TemperatureChoice):
    """Validation reliability before and after temperature scaling (the fitted T, marked when it was not kept)."""
    from pipelines.train import plots

    fitted = calibrated if choice.applied else calibration.apply_temperature(raw, choice.fitted)
    name = f"temperature {choice.fitted:.2f}" + ("" if choice.applied else " (not kept: T = 1)")
    return plots.reliability_figure(
        {"uncalibrated": calibration.reliability(raw, labels), name: calibration.reliability(fitted, labels)},
        f"validation reliability, {len(labels)} images (top label, 15 bins)",
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


def figures(model, pretrain_checkpoint: str | None, dataset: IngestedDataset, cfg: RunConfig, names: list[str], report, probs, labels,
            title: str = "") -> dict:
    """Confusion matrix, ROC curves (``title``: split, images, epoch), attention overlays and masked reconstructions
    on validation images."""
    import torch

    from pipelines.train import plots
    from pipelines.data.streams import eval_stream

    out = {
        "plots/confusion_matrix.png": plots.confusion_figure(report.confusion, names, f"confusion matrix: {title}"),
        "plots/roc_curves.png": plots.roc_figure(probs, labels, names, report.per_class_auc, f"ROC: {title}"),
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
