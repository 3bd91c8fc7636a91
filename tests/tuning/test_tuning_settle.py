"""After a sweep, each trial's MLflow run must carry Tune's verdict, whatever the trial wrote itself.

Real MLflow (SQLite store); the rows are what `trial_rows` builds from Tune's results. The races
this guards against were seen in the sweep test: a trial ASHA stopped ended FAILED.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from tuning.sweep import fail_orphan_trials, settle_child_runs
from tuning.trial import ERROR_TAG, PARENT_TAG, TRIAL_TAG, record_trial_error


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


def test_a_trial_error_is_tagged_and_its_status_left_to_the_verdict_whenever_it_arrives(tmp_path):
    """A stopped trial's exception can arrive before or after the sweep settles its run: either way
    the run ends with Tune's word, and a real crash ends FAILED with the error on the run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("late", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="sweep").info.run_id

    def trial(trial_id: str) -> str:
        return client.create_run(experiment_id, run_name=trial_id, tags={PARENT_TAG: parent, TRIAL_TAG: trial_id}).info.run_id

    stopped_late, stopped_early, crashed = trial("late"), trial("early"), trial("crash")
    record_trial_error(client, stopped_early, RuntimeError("controller gone"))  # the exception before the verdict...
    record_trial_error(client, crashed, ValueError("bad batch"))
    assert client.get_run(crashed).info.status == "RUNNING"  # ...changes no status
    rows = [_row("late", "stopped early"), _row("early", "stopped early"), _row("crash", "error")]
    assert settle_child_runs(uri, experiment_id, parent, rows) == 3
    record_trial_error(client, stopped_late, RuntimeError("controller gone"))  # ...or after it
    assert client.get_run(stopped_late).info.status == "KILLED"
    assert client.get_run(stopped_early).info.status == "KILLED"
    assert client.get_run(crashed).info.status == "FAILED"
    assert client.get_run(crashed).data.tags[ERROR_TAG] == "ValueError: bad batch"


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


def test_a_run_that_cannot_take_the_error_tag_does_not_hide_the_trials_error(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    record_trial_error(client, "0" * 32, RuntimeError("out of memory"))  # no such run: the tag fails, nothing is raised
    assert "could not tag run 00000000000000000000000000000000 with the trial's error" in capsys.readouterr().err
