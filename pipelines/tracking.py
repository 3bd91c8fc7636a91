"""MLflow, all of it: where runs go, what a run logs (from the driver and from rank 0 of the
workers), and the model registry with the ``champion`` alias. Nothing else in ``pipelines``
calls MLflow, so the tracking back end can be read (or swapped) in one file.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

import msmae

CHAMPION = "champion"
# Requirements recorded with the model; giving them avoids MLflow's slow inference (~20 s).
MODEL_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "timm==1.0.31", "msmae-ray==0.1.0"]


def resolve_tracking_uri(explicit: str | None, workdir: Path) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite in the working folder.

    The SQLite path is made absolute so Ray workers (other working directories) write to
    the same store as the driver.
    """
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(workdir / 'mlflow.db').resolve()}"


class TrackingUnreachable(RuntimeError):
    """Runs could not be logged to the tracking URI; raised in seconds, before ingest and Ray start-up."""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when runs could not be logged there.

    Why: MLflow contacts the server only after ingest and Ray start-up, then retries a dead
    one for minutes (263 s of silence, then a traceback). An HTTP server must answer (any
    status: authentication and routing are MLflow's to report); a SQLite store must be a file
    under a folder. Other schemes (databricks, file) are left to MLflow.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingUnreachable(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it, or pass another --tracking-uri "
                "(or unset MLFLOW_TRACKING_URI to log to SQLite in --workdir)"
            ) from None
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        ancestor = next(p for p in (db.parent, *db.parent.parents) if p.exists() or p == p.parent)
        if db.is_dir() or not ancestor.is_dir():
            raise TrackingUnreachable(f"tracking URI {uri}: {db if db.is_dir() else ancestor} is not a file under a folder; "
                                      "choose another --tracking-uri or --workdir")


def set_experiment(tracking_uri: str, experiment: str, workdir: Path) -> None:
    """Select (creating if needed) the experiment; with SQLite its artifacts live in ``workdir``."""
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = (workdir / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment)


@contextlib.contextmanager
def active_run(run_id: str | None, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """Start a new run, or re-open ``run_id`` (``--resume``), as the active run.

    Ctrl-C ends it as KILLED rather than FAILED: nothing failed, and ``--resume`` re-opens it."""
    with mlflow.start_run(run_id=run_id, run_name=run_name) as run:
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


def log_run_inputs(config: dict, flat_params: dict, dataset_summary: Path, tags: Mapping[str, str]) -> None:
    """What a new training run records before it trains: parameters, the config, the dataset summary."""
    log_params(flat_params)
    mlflow.log_dict(config, "config.yaml")
    mlflow.log_artifact(str(dataset_summary))
    mlflow.set_tags(dict(tags))


def log_report(scalars: Mapping[str, float], report_json: dict | None = None, artifact: str | None = None) -> None:
    """A final report's metrics (``final_val/accuracy`` …) and, optionally, the whole report as JSON."""
    mlflow.log_metrics(dict(scalars))
    if report_json is not None and artifact:
        mlflow.log_dict(report_json, artifact)


def log_figures(figures: Mapping[str, object]) -> None:
    """Matplotlib figures as run artifacts, closed once logged."""
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)


class EpochLogger:
    """Per-epoch metrics from rank 0 of a Ray Train worker group into the driver's MLflow run.

    One value per epoch and metric, across restarts: a worker group restored from a checkpoint
    older than the last logged epoch (a driver interrupted mid-epoch, then ``--resume``) trains
    that epoch again, and MLflow cannot replace a logged value, so the epoch's first values stay
    and the re-run's are not logged a second time at the same step.
    """

    def __init__(self, tracking_uri: str, run_id: str, stage: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id, self.stage = run_id, stage
        self.logged = {m.step for m in self.client.get_metric_history(run_id, f"{stage}/epoch")}

    def log(self, metrics: Mapping[str, float], epoch: int) -> None:
        from mlflow.entities import Metric

        if epoch in self.logged:
            return
        self.logged.add(epoch)
        now = int(time.time() * 1000)
        values = [Metric(f"{self.stage}/{k}", float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
        self.client.log_batch(self.run_id, metrics=values)


def log_params(params: dict) -> None:
    """Log a flat parameter dict (MLflow caps a batch at 100 params)."""
    items = [(k, "null" if v is None else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def register_model(
    model: msmae.MSMAEClassifier,
    model_name: str,
    class_names: list[str],
    metric_name: str,
    metric_value: float,
    dataset_fingerprint: str,
    example: torch.Tensor,
    extra_tags: dict[str, str] | None = None,
) -> tuple[str, bool]:
    """Log the classifier to the active run, register it, and move ``champion`` if it wins.

    Returns ``(version, became_champion)``. The comparison is only against a champion
    evaluated on the same validation split (same dataset fingerprint); a champion from
    another dataset is replaced.
    """
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    with torch.no_grad():
        probs = model(example).softmax(-1)
    signature = infer_signature(example.numpy(), probs.numpy())
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",  # the module itself comes back (attention maps, hooks)
        signature=signature,
        pip_requirements=MODEL_REQUIREMENTS,
        metadata={"class_names": class_names, "preset": msmae.models.preset_dict(model.preset)},
        registered_model_name=model_name,
    )
    version = str(info.registered_model_version)
    client = MlflowClient()
    tags = {metric_name: f"{metric_value:.6f}", "dataset_fingerprint": dataset_fingerprint, "class_names": ",".join(class_names), **(extra_tags or {})}
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    beats = _beats_champion(client, model_name, metric_name, metric_value, dataset_fingerprint)
    if beats:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    return version, beats


def _beats_champion(client: MlflowClient, name: str, metric_name: str, value: float, fingerprint: str) -> bool:
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return True  # no champion yet
    if champion.tags.get("dataset_fingerprint") != fingerprint:
        return True
    current = float(champion.tags.get(metric_name, "nan"))
    return math.isnan(current) or value > current


def load_champion(model_uri: str) -> msmae.MSMAEClassifier:
    """``models:/NAME@champion`` (or any model URI) back as the msmae classifier module."""
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")
