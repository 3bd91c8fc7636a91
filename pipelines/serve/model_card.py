"""The model card: the registered version's description, written from what the run measured.

Why here and generated: a card typed by hand goes stale the first time a model is retrained.
This one is built from the run's own numbers (validation and test metrics with class names,
calibration before and after, the dataset's fingerprint and counts, the configuration, the
commit) and stored where MLflow users look: the model version's description (markdown),
plus the run artifact ``model_card.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NOT_FOR_DIAGNOSIS = ("**Not for diagnostic use.** This is a research model. It must not be used to diagnose, treat or "
                     "triage patients, nor to replace a clinician's judgement; it has not been clinically validated.")


@dataclass(frozen=True)
class CardFacts:
    model_name: str
    class_names: list[str]
    dataset_path: str
    dataset_summary: dict[str, Any]
    val: Any  # msmae.ClassificationReport (calibrated)
    test: Any | None
    calibration: dict[str, float]  # temperature, ece_val_before/after, ece_test_before/after
    selection_metric: str
    selected_epoch: int
    config: dict[str, Any]
    preset: dict[str, Any]
    preprocessing: dict[str, Any]
    run_id: str
    git_commit: str
    promotion: Any | None = None  # pipelines.serve.promotion.Decision


def evaluated_line(f: "CardFacts") -> str:
    """Exactly what was evaluated: validation only, or validation and a test split once after the choice."""
    chosen = f"Model chosen at fine-tuning epoch {f.selected_epoch} on validation `{f.selection_metric}`"
    if f.test is None:
        return (f"{chosen}. Evaluated on validation only ({f.val.num_samples} images; the dataset has no test split): the "
                "same images chose the epoch and fitted the temperature, so these numbers are optimistic.")
    return (f"{chosen}. Evaluated on validation ({f.val.num_samples} images) and on the test split ({f.test.num_samples} "
            "images), the test split once, after the choice.")


def promotion_lines(decision: Any | None) -> list[str]:
    """Why the version has (or lacks) an alias: the quality gate's numbers and the comparison with the champion."""
    if decision is None:
        return []
    g = decision.gate
    lines = ["## Promotion", decision.reason, "",
             f"- quality gate on {g.images} {g.split} images: balanced accuracy {g.balanced_accuracy:.3f} (95% lower bound "
             f"{g.balanced_accuracy_lower:.3f}) vs chance {g.chance:.3f}; accuracy {g.accuracy:.3f} (Wilson 95% lower bound "
             f"{g.accuracy_lower:.3f}) vs the majority-class baseline {g.majority_accuracy:.3f} (always `{g.majority_class}`)"]
    c = decision.comparison
    if c is not None:
        lines.append(c.card_line())
    return lines + [""]


def model_description() -> str:
    """The registered model's description: what every version of it is and is not."""
    return (
        "MSMAE ViT image classifier (masked-autoencoder pre-training with supervised attention masking, then fine-tuning), "
        "trained with msmae-ray.\n\n" + NOT_FOR_DIAGNOSIS + "\n\n"
        "Load any version with `mlflow.pyfunc.load_model(\"models:/<name>@champion\")` and call "
        "`predict(pandas.DataFrame({\"image\": [open(\"scan.png\", \"rb\").read()]}))`: labelled, temperature-calibrated "
        "probabilities `prob_<class>` "
        "and `predicted_class`. Each version's description is its model card (data, metrics, calibration, configuration). "
        "See docs/model.md in the msmae-ray repository."
    )


def _metrics_rows(name: str, report: Any, class_names: list[str], ece_before: float, ece_after: float) -> list[str]:
    aucs = ", ".join(f"{c} {a:.3f}" for c, a in zip(class_names, report.per_class_auc))
    return [
        f"| {name} | {report.num_samples} | {report.accuracy:.3f} | {report.balanced_accuracy:.3f} | {report.macro_f1:.3f} "
        f"| {report.macro_auc:.3f} | {ece_before:.3f} → {ece_after:.3f} |",
        f"|  | per-class ROC AUC: {aucs} | | | | | |",
    ]


def _calibration_text(cal: dict) -> str:
    if cal.get("temperature_applied", True):
        return (f"Temperature scaling: logits divided by T = {cal['temperature']:.3f}, fitted on validation NLL (it lowered validation "
                "ECE), applied by the registered model, `msmae predict` and `msmae evaluate`.")
    return (f"Temperature scaling not applied: the fitted T = {cal.get('fitted_temperature', float('nan')):.3f} did not lower "
            f"validation ECE ({cal['ece_val_before']:.4f} -> {cal.get('ece_val_fitted', float('nan')):.4f}), so the model keeps "
            "T = 1 (its probabilities as trained).")


def render(f: CardFacts) -> str:
    """The card as markdown (kept under MLflow's 5,000-character description limit for small class counts)."""
    s = f.dataset_summary
    counts = s.get("counts", {})
    split_line = "; ".join(
        f"{split}: {counts[split].get('total', sum(v for v in counts[split].values()))} images (" +
        ", ".join(f"{c} {counts[split].get(c, 0)}" for c in f.class_names) + ")"
        for split in ("train", "val", "test") if split in counts and counts[split]
    )
    origin = s.get("source") or {}
    cal = f.calibration
    ft, pt, model = f.config.get("finetune", {}), f.config.get("pretrain", {}), f.config.get("model", {})
    lines = [
        f"# {f.model_name}: MSMAE ViT classifier, {len(f.class_names)} classes",
        "",
        NOT_FOR_DIAGNOSIS,
        "",
        "## Intended use",
        "Research on medical image classification methods (MSMAE vs. other pre-training), demonstrations of the msmae-ray "
        "pipeline, and a baseline for further work. Out of scope: any clinical decision, images unlike the training data "
        "(other modality, scanner, population or preprocessing), and classes outside the list below (the model always "
        "answers with one of them).",
        "",
        "## Classes (output order)",
        ", ".join(f"`{i}` {c}" for i, c in enumerate(f.class_names)),
        "",
        "## Data",
        f"- ingested dataset `{f.dataset_path}` from {origin.get('kind', 'unknown')} `{origin.get('root') or origin.get('manifest', '?')}`",
        f"- fingerprint `{s.get('fingerprint', '')}` (logged as the run's MLflow dataset input)",
        f"- {split_line}",
        f"- {s.get('quarantined', 0)} files quarantined at ingest, {s.get('duplicate_groups', 0)} duplicate groups kept in one split",
        "",
        "## Metrics (whole images, the probabilities the model returns: temperature-scaled when T != 1)",
        evaluated_line(f),
        "",
        "| split | images | accuracy | balanced acc. | macro-F1 | macro ROC AUC | ECE before → after |",
        "|---|---|---|---|---|---|---|",
        *_metrics_rows("validation", f.val, f.class_names, cal["ece_val_before"], cal["ece_val_after"]),
        *(_metrics_rows("test", f.test, f.class_names, cal["ece_test_before"], cal["ece_test_after"]) if f.test is not None else []),
        "",
        *promotion_lines(f.promotion),
        "## Calibration",
        _calibration_text(cal) + " ECE: 15 equal-width confidence bins (top label). "
        + ("ECE on validation is optimistic: T was fitted there." if f.test is None else "Test ECE is the honest one: T was fitted on validation."),
        "",
        "## Preprocessing (done by the model)",
        f"Ingest's decode (16-bit stretched to 8-bit, alpha on black, CMYK/palette to RGB, DICOM modality + VOI LUT), "
        f"channel mode {f.preprocessing.get('mode')}, max side {f.preprocessing.get('max_side')}, then the whole image resized "
        f"to {f.preprocessing.get('img_size')} px ({f.preprocessing.get('interpolation')}), ImageNet mean/std.",
        "",
        "## Configuration",
        f"- ViT preset {model.get('preset')} (embed {f.preset.get('embed_dim')}, depth {f.preset.get('depth')}, patch "
        f"{f.preset.get('patch_size')}, {f.preset.get('img_size')} px, register tokens {f.preset.get('reg_tokens', 0)})",
        f"- pre-training {pt.get('epochs')} epochs, masking {pt.get('masking', {}).get('strategy')}; fine-tuning {ft.get('epochs')} "
        f"epochs, masking {ft.get('masking', {}).get('strategy')}, blr {ft.get('blr')}, batch {ft.get('batch_size')}",
        "- the full configuration: the run's `config.yaml` artifact",
        "",
        "## Provenance",
        f"MLflow run `{f.run_id}`, code at git commit `{f.git_commit}`.",
        "",
        "## Limitations",
        "Small models trained on small data vary from run to run; per-class performance differs (see per-class AUC); "
        "calibration holds for data like the validation split only.",
    ]
    return "\n".join(lines) + "\n"
