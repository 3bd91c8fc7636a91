"""The sweep's summary: a table of trials and plots of the objective against the masking ratios,
plus Optuna's parameter importances, logged to the sweep's parent MLflow run."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow

from tuning.space import SearchSpace

RATIO_KEYS = (
    "pretrain.masking.mask_ratio", "pretrain.masking.throw_ratio", "finetune.masking.mask_ratio", "finetune.masking.throw_ratio",
)


def trial_rows(results, tune_metric: str) -> list[dict]:
    """One row per trial: id, status (finished / stopped early / error), objective, params, checkpoints."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        if result.error is not None:
            status = "error"
        elif metrics.get("trial_finished"):
            status = "finished"
        else:
            status = "stopped early"  # ASHA cut it at a rung
        objective = metrics.get(tune_metric, float("nan"))
        rows.append({
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            "status": status,
            "objective": float(objective) if objective is not None else float("nan"),
            "epochs_reported": int(metrics.get("training_iteration", 0) or 0),
            "params": dict(result.config or {}),
            "best_checkpoint": metrics.get("best_checkpoint") if status == "finished" else None,
            "pretrain_checkpoint": metrics.get("pretrain_checkpoint") if status == "finished" else None,
        })
    return sorted(rows, key=lambda r: (math.isnan(r["objective"]), -r["objective"] if not math.isnan(r["objective"]) else 0))


def markdown_table(rows: list[dict], objective: str) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    short = [k.replace("masking.", "").replace("pretrain.", "pre.").replace("finetune.", "ft.") for k in keys]
    lines = ["| trial | status | " + objective + " | " + " | ".join(short) + " |", "|" + "---|" * (3 + len(keys))]
    for r in rows:
        values = [_fmt(r["params"].get(k)) for k in keys]
        lines.append(f"| {r['trial_id']} | {r['status']} | {_fmt(r['objective'])} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def log_summary(rows: list[dict], space: SearchSpace, optuna_db: Path, study_name: str, log=print) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    table = markdown_table(rows, space.objective)
    log("sweep result:\n" + table)
    mlflow.log_text(table, "sweep/trials.md")
    frame = pl.DataFrame([{"trial_id": r["trial_id"], "status": r["status"], "objective": r["objective"], **{k: str(v) for k, v in r["params"].items()}} for r in rows])
    mlflow.log_text(frame.write_csv(), "sweep/trials.csv")
    mlflow.log_metrics({"sweep_trials_finished": sum(r["status"] == "finished" for r in rows),
                        "sweep_trials_stopped_early": sum(r["status"] == "stopped early" for r in rows),
                        "sweep_trials_failed": sum(r["status"] == "error" for r in rows)})

    scored = [r for r in rows if r["status"] != "error" and not math.isnan(r["objective"])]
    present = [k for k in RATIO_KEYS if any(k in r["params"] for r in scored)]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.4), squeeze=False)
        for ax, key in zip(axes[0], present, strict=True):
            points = [(r["params"][key], r["objective"], r["status"]) for r in scored if key in r["params"]]
            for status, marker in (("finished", "o"), ("stopped early", "x")):
                xs = [p[0] for p in points if p[2] == status]
                ys = [p[1] for p in points if p[2] == status]
                ax.scatter(xs, ys, marker=marker, label=status)
            ax.set_xlabel(key)
            ax.set_ylabel(space.objective)
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        mlflow.log_figure(fig, "sweep/objective_vs_ratios.png")
        plt.close(fig)
    importances = _param_importances(optuna_db, study_name, log)
    if importances:
        fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1.2))
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        ax.set_xlabel("importance (Optuna fANOVA)")
        fig.tight_layout()
        mlflow.log_figure(fig, "sweep/param_importance.png")
        plt.close(fig)
        mlflow.log_dict(importances, "sweep/param_importance.json")


def _param_importances(optuna_db: Path, study_name: str, log=print) -> dict[str, float]:
    """Optuna's importances over the study's completed trials; empty when there are too few to say."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{optuna_db}")
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError, KeyError) as e:  # fewer than two completed trials, or no variation
        log(f"parameter importance not computed: {e}")
        return {}
