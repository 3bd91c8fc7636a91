"""After a sweep, each trial's MLflow run must carry Tune's verdict, whatever the trial wrote itself.

Real MLflow (SQLite store); the rows are what `trial_rows` builds from Tune's results. The races
this guards against were seen in the sweep test: a trial ASHA stopped marked itself FAILED.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tuning.sweep import fail_orphan_trials, settle_child_runs
from tuning.trial import PARENT_TAG, TRIAL_TAG, mark_failed_unless_settled


def _row(trial_id: str, status: str) -> dict:
    return {"trial_id": trial_id, "status": status, "objective": 0.5, "epochs_reported": 1, "params": {}}


def test_runs_are_settled_to_tunes_verdict_and_keep_their_end_time(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("settle", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    other_parent = client.create_run(experiment_id, run_name="another sweep").info.run_id

    def child(trial_id: str, parent_id: str = parent, status: str | None = None, end_time: int | None = None) -> str:
        run_id = client.create_run(experiment_id, run_name=trial_id, tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id}).info.run_id
        if status is not None:
            client.set_terminated(run_id, status, end_time=end_time)
        return run_id

    stopped_running = child("a")
    stopped_failed = child("b", status="FAILED", end_time=1_700_000_000_000)
    finished = child("c", status="FINISHED")
    crashed = child("d", status="FAILED")
    orphan_running = child("e")
    elsewhere = child("f", parent_id=other_parent)
    rows = [_row("a", "stopped early"), _row("b", "stopped early"), _row("c", "finished"), _row("d", "error")]

    assert settle_child_runs(uri, experiment_id, parent, rows) == 3
    status = {run_id: client.get_run(run_id).info for run_id in (stopped_running, stopped_failed, finished, crashed, orphan_running, elsewhere)}
    assert status[stopped_running].status == "KILLED"
    assert status[stopped_failed].status == "KILLED" and status[stopped_failed].end_time == 1_700_000_000_000
    assert status[finished].status == "FINISHED"
    assert status[crashed].status == "FAILED"
    assert status[orphan_running].status == "KILLED"  # no row: a trial Tune never reported on cannot still be running
    assert status[elsewhere].status == "RUNNING"  # another sweep's runs are not touched
    assert settle_child_runs(uri, experiment_id, parent, rows) == 0  # settling twice changes nothing


def test_a_stopped_trial_failing_late_does_not_overwrite_the_settled_verdict(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("late", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id
    stopped = client.create_run(experiment_id, run_name="s", tags={PARENT_TAG: parent, TRIAL_TAG: "s"}).info.run_id

    assert settle_child_runs(uri, experiment_id, parent, [_row("s", "stopped early")]) == 1  # the sweep settles first...
    mark_failed_unless_settled(client, stopped)  # ...then the stopped trial's exception arrives
    crashing = client.create_run(experiment_id, run_name="c", tags={PARENT_TAG: parent, TRIAL_TAG: "c"}).info.run_id
    mark_failed_unless_settled(client, crashing)  # a trial that really fails while running
    assert client.get_run(stopped).info.status == "KILLED"
    assert client.get_run(crashing).info.status == "FAILED"


def test_trials_an_interrupted_driver_left_running_are_marked_failed_and_the_others_kept(tmp_path):
    """Real Optuna (SQLite study): after Tune has finished, a RUNNING trial is an orphan of a killed driver."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="sweep", storage=storage, direction="maximize")
    done = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study.tell(done, 0.7)
    pruned = study.ask()
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    orphan = study.ask()  # asked for, never told: the driver died here

    assert fail_orphan_trials(tmp_path / "optuna.db", "sweep") == 1
    states = {t.number: t.state for t in optuna.load_study(study_name="sweep", storage=storage).trials}
    assert states == {done.number: optuna.trial.TrialState.COMPLETE, pruned.number: optuna.trial.TrialState.PRUNED,
                      orphan.number: optuna.trial.TrialState.FAIL}
    assert fail_orphan_trials(tmp_path / "optuna.db", "sweep") == 0  # nothing left to mark
