"""Log comparison results (the JSON lines of benchmarks/compare.py) to MLflow.

Kept apart from compare.py so the GPU box, which has no MLflow, never imports it. One
experiment per dataset; one MLflow run per (method, seed) with the recipe as params,
per-epoch curves as step metrics, the selected epoch's validation and the test metrics as
final metrics; plus a ``summary`` run holding the markdown table. Runs already logged (same
session, dataset, method and seed) are skipped, so reporting twice adds nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

_CURVE_KEYS = ("train_loss", "train_loss_recon", "train_loss_cls", "val_accuracy", "val_balanced_accuracy",
               "val_macro_f1", "val_macro_auc", "val_loss", "lr", "seconds")


def run_key(record: dict) -> str:
    """One run of a session: method and seed, and, where a session has several of them, the
    grid's learning rate and the pre-training snapshot it was fine-tuned from."""
    key = f"{record.get('session', '?')}/{record['dataset']}/{record['method']}/{record['seed']}"
    if record.get("tuned_lr", {}).get("from_grid"):
        key += f"/blr{record['tuned_lr']['blr']:g}"
    if record.get("pretrain_checkpoint_epoch") is not None:
        key += f"/e{record['pretrain_checkpoint_epoch']}"
    return key


def _params(record: dict) -> list[Param]:
    flat = {"method": record["method"], "seed": record["seed"], "dataset": record["dataset"], "preset": record.get("preset"),
            "bundle": record.get("bundle"), "pretrain_epochs_run": record["pretrain_epochs"],
            "finetune_epochs_run": record["finetune_epochs"], "image_passes": record["image_passes"],
            **{f"recipe.{k}": v for k, v in record["recipe"].items()}}
    return [Param(k, str(v)) for k, v in flat.items()]


def _metrics(record: dict, timestamp: int) -> list[Metric]:
    out = []
    for stage in ("pretrain", "finetune"):
        for row in record[f"{stage}_curve"]:
            for key in _CURVE_KEYS:
                value = row.get(key)
                if isinstance(value, (int, float)) and value == value:
                    out.append(Metric(f"{stage}/{key}", float(value), timestamp, row["epoch"]))
    finals = {**{f"test_{k}": v for k, v in record["test"].items()}, **{f"val_{k}": v for k, v in record["val"].items()},
              "selected_epoch": record["selected_epoch"], "wall_seconds": record["wall_seconds"],
              "pretrain_seconds": record["pretrain_seconds"], "finetune_seconds": record["finetune_seconds"]}
    out += [Metric(k, float(v), timestamp, 0) for k, v in finals.items() if isinstance(v, (int, float)) and v == v]
    return out


def log_records(records: list[dict], uri: str, experiment_template: str, tables: Callable[[list[dict]], str]) -> Iterator[str]:
    """Log each record under its dataset's experiment (``tables(rows)`` renders the summary);
    yields one line of news per run."""
    client = MlflowClient(tracking_uri=uri)
    by_dataset: dict[str, list[dict]] = {}
    for r in records:
        by_dataset.setdefault(r["dataset"], []).append(r)
    for dataset, rows in by_dataset.items():
        name = experiment_template.format(dataset=dataset)
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        logged = {r.data.tags.get("compare_key") for r in client.search_runs([experiment_id], max_results=50000)}
        for record in rows:
            key = run_key(record)
            if key in logged:
                yield f"{name}: {record['method']} seed {record['seed']} already logged, skipped"
                continue
            tags = {"compare_key": key, "mlflow.runName": f"{record['method']}-seed{record['seed']}",
                    "device": record.get("device", "?"), "method": record["method"], "description": record.get("description", ""),
                    "pretrain_shared": str(record.get("pretrain_shared", False)), "session": record.get("session", "?")}
            run = client.create_run(experiment_id, start_time=None, tags=tags)
            timestamp = run.info.start_time
            metrics, params = _metrics(record, timestamp), _params(record)
            for start in range(0, len(params), 100):  # MLflow's per-batch limits
                client.log_batch(run.info.run_id, params=params[start:start + 100])
            for start in range(0, len(metrics), 1000):
                client.log_batch(run.info.run_id, metrics=metrics[start:start + 1000])
            client.log_dict(run.info.run_id, {"test_confusion": record.get("test_confusion"), "classes": record.get("classes")}, "confusion.json")
            client.set_terminated(run.info.run_id)
            logged.add(key)
            yield f"{name}: logged {record['method']} seed {record['seed']} (run {run.info.run_id})"
        summary_key = "summary/" + ",".join(sorted({r.get("session", "?") for r in rows}))
        if summary_key in logged:
            continue
        summary = client.create_run(experiment_id, tags={"mlflow.runName": "summary", "compare_key": summary_key})
        client.log_text(summary.info.run_id, tables(rows), "comparison.md")
        client.set_terminated(summary.info.run_id)
        yield f"{name}: table logged as comparison.md (run {summary.info.run_id})"
