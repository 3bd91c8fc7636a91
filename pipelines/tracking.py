"""MLflow logging: where runs go and what a run logs, from the driver and from rank 0 of the workers.

Every MLflow call of training goes through here, so the tracking back end can be read (or
swapped) in one file. The model registry (log a model, the ``champion`` alias) is
``pipelines.serve.registry``: logging knows nothing of models.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.redact import mask_text, mask_uri, split_credentials

REPO = Path(__file__).resolve().parents[1]


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
        bare, user, password = split_credentials(uri)  # MLflow sends user:password as basic auth; so does this check
        request = urllib.request.Request(bare.rstrip("/") + "/health")
        if user is not None:
            token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise TrackingUnreachable(
                f"MLflow tracking server {mask_uri(uri)} is not reachable ({reason}); start it, or pass another --tracking-uri "
                "(or unset MLFLOW_TRACKING_URI to log to SQLite in --workdir)"
            ) from None
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        ancestor = next(p for p in (db.parent, *db.parent.parents) if p.exists() or p == p.parent)
        if db.is_dir() or not ancestor.is_dir():
            raise TrackingUnreachable(f"tracking URI {mask_uri(uri)}: {db if db.is_dir() else ancestor} is not a file under a folder; "
                                      "choose another --tracking-uri or --workdir")
    elif parsed.scheme.split("+")[0] in _DATABASE_SCHEMES:
        _check_database_driver(uri)


# Database back ends MLflow reaches through SQLAlchemy: their driver must be importable here, or MLflow
# fails only after ingest and Ray start-up.
_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "oracle")


def _check_database_driver(uri: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        dialect = make_url(uri).get_dialect()
        dialect.import_dbapi()
    except ImportError as e:
        raise TrackingUnreachable(
            f"tracking URI {mask_uri(uri)}: its database driver ({dialect.name}+{dialect.driver}) is not installed ({e}); "
            "install it, or name an installed one in the URI (the `server` extra installs psycopg2: postgresql+psycopg2://...), "
            "or choose another --tracking-uri"
        ) from None
    except Exception as e:  # noqa: BLE001 - a malformed URL or unknown dialect: say which, in one line
        raise TrackingUnreachable(f"tracking URI {mask_uri(uri)} is not a database URL SQLAlchemy can use ({e})") from None


def set_experiment(tracking_uri: str, experiment: str, workdir: Path) -> None:
    """Select (creating if needed) the experiment; with SQLite its artifacts live in ``workdir``."""
    if split_credentials(tracking_uri)[2] is not None:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # MLflow would print the URI with its password
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


def log_report(scalars: Mapping[str, float], report_json: dict | None = None, artifact: str | None = None, step: int | None = None) -> None:
    """A final report's metrics (``final_val/accuracy`` …) and, optionally, the whole report as JSON.

    ``step``: the chosen epoch, so that registering the model at that step links these metrics to it."""
    mlflow.log_metrics(dict(scalars), step=step)
    if report_json is not None and artifact:
        mlflow.log_dict(report_json, artifact)


def log_text(text: str, artifact: str) -> None:
    mlflow.log_text(text, artifact)


def active_run_id() -> str:
    run = mlflow.active_run()
    return run.info.run_id if run else ""


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

    The tracking server going away does not stop training: a batch that cannot be written is kept
    and sent with the next epoch's (in order, each at its own step), the loss of contact is said
    once, and MLflow's own retries are cut from minutes to seconds in this process so an epoch
    never waits long on a dead server.
    """

    def __init__(self, tracking_uri: str, run_id: str, stage: str, say: Callable[[str], None] = print) -> None:
        # this process only logs metrics: seconds of retrying, not MLflow's default minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id, self.stage, self.say = run_id, stage, say
        self.pending: list = []  # metrics not yet written, oldest first
        self.unreachable = False
        try:
            self.logged = {m.step for m in self.client.get_metric_history(run_id, f"{stage}/epoch")}
        except Exception as e:  # noqa: BLE001 - no contact at start: log what comes, MLflow keeps the first value per step
            self.logged = set()
            self._lost(e)

    def log(self, metrics: Mapping[str, float], epoch: int) -> None:
        from mlflow.entities import Metric

        if epoch in self.logged:
            return
        self.logged.add(epoch)
        now = int(time.time() * 1000)
        self.pending += [Metric(f"{self.stage}/{k}", float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v]
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; True when nothing is left (MLflow takes at most 1,000 metrics a batch)."""
        while self.pending:
            batch = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - any failure to reach the server: keep the metrics, keep training
                self._lost(e)
                return False
            del self.pending[:len(batch)]
        if self.unreachable:
            self.unreachable = False
            self.say(f"[{self.stage}] tracking server reachable again: buffered metrics written")
        return True

    def _lost(self, error: Exception) -> None:
        if not self.unreachable:
            self.unreachable = True
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            self.say(f"[{self.stage}] warning: tracking server unreachable ({mask_text(first)}); training goes on, "
                     "metrics are kept and sent when it answers again")


def log_params(params: dict) -> None:
    """Log a flat parameter dict (MLflow caps a batch at 100 params)."""
    items = [(k, "null" if v is None else str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def git_commit() -> str:
    """The commit the code was at (``+dirty`` with uncommitted changes), or ``unknown`` outside git."""
    import subprocess

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def log_dataset_input(dataset, context: str = "training") -> None:
    """The ingested dataset as an MLflow input of the active run: its index (source, class, split, size;
    no pixels), digest from ingest's fingerprint, so runs on the same data show the same dataset."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["index", "source", "label_name", "split", "width", "height"]
    tables = [pq.read_table(f, columns=columns) for split in dataset.non_empty_splits() for f in dataset.shard_files(split)]
    if not tables:
        return
    origin = dataset.summary.get("source") or {}
    name = Path(str(origin.get("root") or origin.get("manifest") or dataset.path)).name
    with without_expected_mlflow_warnings():
        data = mlflow.data.from_pandas(pa.concat_tables(tables).to_pandas(), source=str(dataset.path), targets="label_name",
                                       name=name, digest=(dataset.fingerprint or "unknown")[:32])  # MLflow keeps 36 characters
        mlflow.log_input(data, context=context, tags={"fingerprint": dataset.fingerprint})


# MLflow warnings about choices made here on purpose, which would otherwise end every run's output:
# the dataset's source is a local folder (not a URI of one of its source types) and the input
# example's integer columns never hold missing values. (MLflow's hint to add type hints to the
# pyfunc's ``predict`` cannot be filtered: its wrapper inserts its own "once" filter just before
# warning. The signature is explicit because paths, bytes and arrays mix in one column.)
_EXPECTED_MLFLOW_WARNINGS = (
    r"The specified dataset source can be interpreted in multiple ways",
    r"Hint: Inferred schema contains integer column",
)


@contextlib.contextmanager
def without_expected_mlflow_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _EXPECTED_MLFLOW_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def log_outcome(tag: str, line: str, data: dict | list, artifact: str) -> None:
    """A run's verdict as a tag (its one line, searchable in the UI) and the details as a JSON artifact
    (``msmae.promotion`` / ``promotion.json``, ``msmae.health`` / ``health.json``)."""
    mlflow.set_tag(tag, line[:5000])  # MLflow's SQL stores keep 5,000 characters of a tag value
    mlflow.log_dict(data, artifact)


def metric_histories(tracking_uri: str, run_id: str, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``(step, value)`` of each metric key the run logged (empty for keys it never logged)."""
    client = MlflowClient(tracking_uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}
