"""The end-of-run summary: the last lines ``msmae run`` / ``pretrain`` / ``finetune`` print.

Why: a user finishing a run wants to copy four things (the model URI, the run, the checkpoint,
the artifacts) and know two (did the model become champion, and why; is anything wrong). They
were spread over hundreds of lines, or not printed at all. The first line is ``== summary ==``
so scripts and eyes find the block; secrets in the tracking URI are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines.redact import mask_uri

HEADER = "== summary =="


@dataclass(frozen=True)
class RunSummary:
    run_name: str
    run_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    artifacts: str  # the run's artifact URI
    pretrain_checkpoint: str | None
    checkpoint: str | None  # the chosen fine-tuning checkpoint (None: pre-training only)
    model_name: str | None = None
    version: str | None = None
    alias: str | None = None  # champion / challenger / None
    decision: str | None = None  # promotion.Decision.reason
    warnings: list[str] = field(default_factory=list)


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page: on the server itself for an HTTP tracking URI, else on ``mlflow ui`` over the store."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{mask_uri(tracking_uri).rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page} (after: mlflow ui --backend-store-uri {mask_uri(tracking_uri)} --host 127.0.0.1 --port 5000)"


def summary_lines(s: RunSummary) -> list[str]:
    lines = [
        HEADER,
        f"run         {s.run_name} (MLflow run {s.run_id}, experiment {s.experiment})",
        f"run URL     {run_url(s.tracking_uri, s.experiment_id, s.run_id)}",
    ]
    if s.version is not None:
        aliased = f"   alias: models:/{s.model_name}@{s.alias}" if s.alias else "   (no alias)"
        lines += [f"model URI   models:/{s.model_name}/{s.version}{aliased}",
                  f"promotion   {s.decision}"]
    if s.checkpoint is not None:
        lines.append(f"checkpoint  {s.checkpoint}")
    if s.pretrain_checkpoint is not None:
        lines.append(f"pre-trained {s.pretrain_checkpoint}" + ("" if s.checkpoint else "   (fine-tune it: msmae finetune SOURCE --init <this>)"))
    lines.append(f"artifacts   {mask_uri(s.artifacts)}")
    if s.warnings:
        lines += [f"warning     {w}" for w in s.warnings]
    else:
        lines.append("health      no warnings")
    return lines
