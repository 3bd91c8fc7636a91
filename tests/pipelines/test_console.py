"""Quiet output: the libraries' known-harmless lines dropped, epoch lines unprefixed, no ANSI codes in a file.

The lines below were captured from the demo's log (`scripts/demo.sh > demo.log 2>&1`, Ray 2.60, MLflow 3.17)
before quiet mode existed, ANSI codes included."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from pipelines import console

CAPTURED = [
    "/work/main/.venv/lib/python3.11/site-packages/mlflow/pyfunc/utils/data_validation.py:187: UserWarning: \x1b[33mAdd type hints "
    "to the `predict` method to enable data validation and automatic signature inference during model logging. Check "
    "https://mlflow.org/docs/latest/model/python_model.html#type-hint-usage-in-pythonmodel for more details.\x1b[0m",
    "  color_warning(",
    "2026-12-02 15:17:37,065\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster. "
    "Set RAY_AUTH_MODE=disabled to opt out. For more information, see https://docs.ray.io/en/latest/ray-security/token-auth.html",
    "\x1b[36m(TrainController pid=6648)\x1b[0m [2026-12-02 15:18:17,223 E 6648 6677] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: '70cd024736ad4fac341cac8501000000' has constructor arguments in the object store and max_restarts > 0. "
    "If the arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.",
    "\x1b[36m(DatasetManager pid=6853)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/interfaces/"
    "execution_options.py:436: RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed after "
    "January 2027. Use `ExecutionOptions.label_selector` to constrain Ray Data work to labeled nodes.",
    "\x1b[36m(DatasetManager pid=6853)\x1b[0m   self.exclude_resources = exclude_resources",
    "\x1b[36m(SplitCoordinator pid=6947)\x1b[0m Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "\x1b[36m(SplitCoordinator pid=6947)\x1b[0m ✔️  Dataset train_0357liQoEu6dsCWBoa9IfN_0 execution finished in 7.13 seconds",
    "\x1b[36m(RayTrainWorker pid=6755)\x1b[0m [pretrain] epoch 1/30  loss 2.1848  val acc 0.408 f1 0.359  50 img/s  data wait 65%  ETA 291s",
    "\x1b[36m(SplitCoordinator pid=6973)\x1b[0m ✔️  Dataset val_0357liRsTzxkDpT1p2iDOn_2 execution finished in 0.27 seconds"
    "\x1b[32m [repeated 3x across cluster]\x1b[0m",
    "\x1b[36m(RayTrainWorker pid=6755)\x1b[0m [pretrain] epoch 2/30  loss 1.5671  val acc 0.508 f1 0.442  117 img/s  data wait 15%  ETA 130s",
    "2026-12-02 15:27:50,313\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "2026/12/02 15:27:54 WARNING mlflow.pyfunc: Passing a Python object as `python_model` causes it to be serialized using "
    "CloudPickle, it requires exercising caution as Python object serialization mechanisms may execute arbitrary code during "
    "deserialization.Consider using a file path (str or Path) instead.",
    "Successfully registered model 'msmae-demo'.",
    "Created version '1' of model 'msmae-demo'.",
    "registered msmae-demo version 1 as @champion",
    "done in 620 s. Open the MLflow UI with:",
    "\x1b[36m(SplitCoordinator pid=13252)\x1b[0m ✔️  Dataset val_0357lo5gyPvIJht2FtM3nX_39 execution finished in 0.28 seconds",
]
# Lines quiet mode must never drop: the run's own, an error, and a warning it does not know.
KEPT = [
    "== summary ==",
    "error: training failed (its checkpoints are kept: --resume continues it): boom",
    "\x1b[36m(RayTrainWorker pid=6755)\x1b[0m [finetune] warning: tracking server unreachable (http://127.0.0.1:5000); training goes on",
    "\x1b[36m(SplitCoordinator pid=6947)\x1b[0m Cluster resources are not enough to run any task from ReadParquet: the run may hang",
    "\x1b[36m(RayTrainWorker pid=6755)\x1b[0m /x/y.py:3: UserWarning: something new",
    "\x1b[36m(RayTrainWorker pid=6755)\x1b[0m   warn(x)",
]


def _through(lines: list[str], quiet: bool = True, chunk: int | None = None) -> list[str]:
    target = io.StringIO()  # not a terminal, like a redirected log
    stream = console.LineFilter(target, quiet=quiet)
    text = "".join(line + "\n" for line in lines)
    for i in range(0, len(text), chunk or len(text)):  # a line may arrive in pieces
        stream.write(text[i:i + (chunk or len(text))])
    stream.drain()
    return target.getvalue().splitlines()


def test_quiet_drops_rays_per_execution_lines_and_known_noise_and_keeps_the_runs_own():
    shown = _through(CAPTURED + KEPT, chunk=7)
    assert shown == [
        "[pretrain] epoch 1/30  loss 2.1848  val acc 0.408 f1 0.359  50 img/s  data wait 65%  ETA 291s",
        "[pretrain] epoch 2/30  loss 1.5671  val acc 0.508 f1 0.442  117 img/s  data wait 15%  ETA 130s",
        "registered msmae-demo version 1 as @champion",
        "done in 620 s. Open the MLflow UI with:",
        "== summary ==",
        "error: training failed (its checkpoints are kept: --resume continues it): boom",
        "[finetune] warning: tracking server unreachable (http://127.0.0.1:5000); training goes on",
        "(SplitCoordinator pid=6947) Cluster resources are not enough to run any task from ReadParquet: the run may hang",
        "(RayTrainWorker pid=6755) /x/y.py:3: UserWarning: something new",
        "(RayTrainWorker pid=6755)   warn(x)",
    ]


def test_verbose_keeps_every_line_but_no_ansi_codes_in_a_file():
    shown = _through(CAPTURED, quiet=False)
    assert len(shown) == len(CAPTURED)
    assert not any("\x1b" in line for line in shown)
    assert shown[7] == "(SplitCoordinator pid=6947) ✔️  Dataset train_0357liQoEu6dsCWBoa9IfN_0 execution finished in 7.13 seconds"


def test_a_dropped_progress_bar_leaves_no_empty_line_and_others_redraw_at_once():
    target = io.StringIO()
    stream = console.LineFilter(target)
    stream.write("\rDownloading artifacts:   0%|          | 0/1")
    stream.write("\rDownloading artifacts: 100%|##########| 1/1")
    stream.write("\n")
    assert target.getvalue() == ""
    stream.write("\rdecode+validate:  50%|#####     | 1/2")
    assert target.getvalue() == "\rdecode+validate:  50%|#####     | 1/2"  # shown before its newline comes


def test_ray_data_logging_config_keeps_its_info_lines_off_the_console():
    """The knob quiet mode sets for Ray Data (RAY_DATA_LOGGING_CONFIG): its INFO lines and the progress note go to
    its log file only; its warnings still reach the console."""
    code = (
        "import logging, ray.data\n"
        "logging.getLogger('ray.data._internal.execution.streaming_executor').info('Dataset d execution finished in 1.00 seconds')\n"
        "logging.getLogger('ray.data._internal.progress').warning('Progress bars disabled. To enable, set ...')\n"
        "logging.getLogger('ray.data._internal.execution.resource_manager').warning('Cluster resources are not enough')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOGGING_CONFIG"}
    default = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "execution finished" in default.stderr, default.stderr  # Ray Data's default: INFO on the console
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(env, RAY_DATA_LOGGING_CONFIG=str(console.RAY_DATA_LOGGING)))
    assert quiet.returncode == 0, quiet.stderr
    assert "Cluster resources are not enough" in quiet.stderr
    assert "execution finished" not in quiet.stderr and "Progress bars disabled" not in quiet.stderr


def test_the_constructor_arguments_note_is_dropped_for_the_two_known_actors_only():
    """Ray's ray#53727 note, as captured above for PreemptionWatcher, with the class name of predict's scoring
    actors (Ray Data prints them as MapWorker(MapBatches(<class>))); the same note on any other actor is kept."""
    note = next(line for line in CAPTURED if "'PreemptionWatcher'" in line)
    scoring = [note.replace("'PreemptionWatcher'", f"'MapWorker(MapBatches({cls}))'") for cls in ("PredictBatchScorer", "MaskBatchScorer")]
    other = note.replace("'PreemptionWatcher'", "'RowCounter'")
    assert _through([note, *scoring, other]) == [console.strip_ansi(other)]
