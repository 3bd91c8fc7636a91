"""Second round of the reliability table (security, data and disk, failures found before training).

Each row is one input or fault run through the real ``msmae`` command line in-process, as in
``tests/test_reliability.py`` (harness: ``tests/cli_harness.py``): its exit code, one clean
``error:`` line naming the file or option, and what it left on disk. Below the table: the cases
that need a real server, a real full device or a real store outage.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from bad_inputs import checkpoint_folder, image_folder, text, write_image
from cli_harness import Q, Case, assert_clean, invoke, no_leftovers, reasons, run_case, summary

# --- a checkpoint that would run code, or cannot be read --------------------------------------------


class _RunsAShellCommand:
    """What a hostile ``state.pt`` holds: unpickling it would run ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(ctx):
    ctx.marker = ctx.tmp / "pwned"
    folder = ctx.tmp / "model"
    folder.mkdir()
    with open(folder / "state.pt", "wb") as f:
        pickle.dump({"model": _RunsAShellCommand(ctx.marker), "preset": {}, "class_names": ["a", "b"]}, f)
    image_folder(ctx.tmp / "raw", {"a": 2, "b": 2})
    return ["evaluate", "--model", folder, "--data", ctx.tmp / "raw", "--out", ctx.tmp / "eval.json"]


def no_code_ran(ctx):
    assert not ctx.marker.exists(), "unpickling the checkpoint ran a shell command"
    assert not (ctx.tmp / "eval.json").exists()


def damaged_checkpoint(how: str):
    def build(ctx):
        folder = checkpoint_folder(ctx.tmp / "model", ["a", "b"])
        state = folder / "state.pt"
        data = state.read_bytes()
        noise = np.random.default_rng(0).bytes(len(data))  # seeded: the same bytes every run
        state.write_bytes(data[: len(data) // 2] if how == "truncated" else noise)
        image_folder(ctx.tmp / "raw", {"a": 2, "b": 2})
        return ["evaluate", "--model", folder, "--data", ctx.tmp / "raw", "--out", ctx.tmp / "eval.json"]
    return build


def altered_checkpoint(ctx):
    """A checkpoint as the worker writes it (with its digest), then one byte changed on disk."""
    import msmae
    from pipelines.checkpoint import write_checkpoint

    model = msmae.build_classifier(msmae.get_preset("tiny", 32), 2, drop_path_rate=0.0)
    folder = write_checkpoint(ctx.tmp / "model", stage="finetune", model_state=model.state_dict(), optimizer_state={},
                              table=msmae.AttentionTable(4, model.preset.grid), epoch=0, best=None, preset=model.preset,
                              class_names=["a", "b"], metrics={"epoch": 0}, config={})
    data = bytearray((folder / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "state.pt").write_bytes(bytes(data))
    image_folder(ctx.tmp / "raw", {"a": 2, "b": 2})
    return ["evaluate", "--model", folder, "--data", ctx.tmp / "raw", "--out", ctx.tmp / "eval.json"]


# --- credentials ----------------------------------------------------------------------------------

SECRET = "s3cr3t-pw"


def run_with_uri(uri: str):
    def build(ctx):
        image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
        return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "w", "--tracking-uri", uri]
    return build


def secret_never_printed(ctx):
    assert not (ctx.tmp / "w" / "storage").exists()


# --- configuration refused before anything starts -------------------------------------------------

def run_with(*options: str):
    def build(ctx):
        image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
        return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "w", *options]
    return build


def no_workdir(ctx):
    assert not (ctx.tmp / "w").exists()


def duplicate_key_config(ctx):
    path = text(ctx.tmp / "twice.yaml", "finetune:\n  epochs: 3\npretrain:\n  epochs: 2\nfinetune:\n  epochs: 9\n")
    return run_with("--config", path)(ctx)


def too_few_for_a_batch(ctx):
    """12 training images against the demo's batch of 64: no step could run."""
    image_folder(ctx.tmp / "src", {"a": 8, "b": 8})
    return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "w"]


def no_training_started(ctx):
    assert not (ctx.tmp / "w" / "storage").exists() and not (ctx.tmp / "w" / "last_run.json").exists()


def workdir_inside_source(ctx):
    image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
    ctx.before = sorted(p.name for p in (ctx.tmp / "src").iterdir())
    return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "src" / "work"]


def source_untouched(ctx):
    assert sorted(p.name for p in (ctx.tmp / "src").iterdir()) == ctx.before


def workdir_busy(ctx):
    """Another msmae command holds the working folder's lock (taken here exactly as a run takes it)."""
    image_folder(ctx.tmp / "src", {"a": 8, "b": 8})
    (ctx.tmp / "w").mkdir()
    ctx.lock = open(ctx.tmp / "w" / "run.lock", "a+")
    fcntl.flock(ctx.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.lock.write("pid 1 on elsewhere")
    ctx.lock.flush()
    return ["run", ctx.tmp / "src", "--workdir", ctx.tmp / "w"]


def busy_run_untouched(ctx):
    ctx.lock.close()
    assert sorted(p.name for p in (ctx.tmp / "w").iterdir()) == ["run.lock"]


def dataset_without_classes(ctx):
    image_folder(ctx.tmp / "src", {"a": 2, "b": 2})
    assert_clean(invoke(["ingest", ctx.tmp / "src", "--out", ctx.tmp / "d", *Q]), 0)
    data = json.loads((ctx.tmp / "d" / "dataset.json").read_text())
    del data["classes"]
    (ctx.tmp / "d" / "dataset.json").write_text(json.dumps(data))
    return ["run", ctx.tmp / "d", "--workdir", ctx.tmp / "w"]


# --- ingest: names, damaged shards, a killed run's leftovers -----------------------------------------

def undecodable_name(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3, "b": 3})
    write_image(Path(os.fsdecode(os.fsencode(str(src / "a")) + b"/scan-\xff\xfe.png")), seed=99)
    return ["ingest", src, "--out", ctx.tmp / "o", *Q]


def undecodable_name_check(ctx):
    assert reasons(ctx.tmp / "o" / "quarantine.csv") == {"file_name_not_utf8": 1}
    assert summary(ctx.tmp / "o")["num_images"] == 6


def damaged_shard(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 4, "b": 4})
    assert_clean(invoke(["ingest", src, "--out", ctx.tmp / "o", *Q]), 0)
    shard = next((ctx.tmp / "o" / "shards").glob("train-*.parquet"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ctx.shard = shard
    unverified = invoke(["ingest", src, "--out", ctx.tmp / "o", *Q])
    assert_clean(unverified, 0, ("up to date", "--verify"))
    return ["ingest", src, "--out", ctx.tmp / "o", "--verify", *Q]


def damaged_shard_repaired(ctx):
    recorded = {s["file"]: s["sha256"] for s in summary(ctx.tmp / "o")["shards"]}
    for rel, digest in recorded.items():
        assert hashlib.sha256((ctx.tmp / "o" / rel).read_bytes()).hexdigest() == digest, rel
    no_leftovers(ctx.tmp)


def killed_ingest_leftover(ctx):
    src = image_folder(ctx.tmp / "src", {"a": 3, "b": 3})
    dead = _a_dead_pid()
    ctx.stale = ctx.tmp / f".o.ingest-{socket.gethostname()}-{dead}-abc123"
    (ctx.stale / "shards").mkdir(parents=True)
    ctx.live = ctx.tmp / f".o.ingest-{socket.gethostname()}-{os.getpid()}-def456"  # a live process: kept
    ctx.live.mkdir()
    return ["ingest", src, "--out", ctx.tmp / "o", *Q]


def stale_staging_removed(ctx):
    assert not ctx.stale.exists() and ctx.live.exists()
    ctx.live.rmdir()
    no_leftovers(ctx.tmp)


def _a_dead_pid() -> int:
    """The pid of a process that has exited (a child started and reaped here)."""
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- predict --heatmaps: never into the input, never over a user's files -----------------------------

def heatmaps_into(where: str):
    def build(ctx):
        folder = checkpoint_folder(ctx.tmp / "model", ["a", "b"])
        image_folder(ctx.tmp / "in", {"a": 2})
        text(ctx.tmp / "mine" / "notes.txt", "a user's file")
        ctx.before = {p.name for p in (ctx.tmp / "in" / "a").iterdir()}
        maps = {"input": ctx.tmp / "in", "inside": ctx.tmp / "in" / "a", "foreign": ctx.tmp / "mine"}[where]
        return ["predict", "--model", folder, "--input", ctx.tmp / "in", "--out", ctx.tmp / "p", "--heatmaps", maps]
    return build


def inputs_untouched(ctx):
    assert {p.name for p in (ctx.tmp / "in" / "a").iterdir()} == ctx.before
    assert (ctx.tmp / "mine" / "notes.txt").read_text() == "a user's file"
    assert not (ctx.tmp / "p").exists()


CASES = [
    # a checkpoint runs no code, and every unreadable one is named
    Case("checkpoint-pickle-with-reduce-is-refused", hostile_checkpoint, 1, ("state.pt", "refused", "could run code"), no_code_ran),
    Case("checkpoint-truncated", damaged_checkpoint("truncated"), 1, ("state.pt", "not a readable weights file")),
    Case("checkpoint-random-bytes", damaged_checkpoint("random"), 1, ("state.pt", "weights file")),
    Case("checkpoint-changed-after-writing", altered_checkpoint, 1, ("state.pt", "does not match the digest")),
    # credentials never printed
    Case("run-tracking-uri-password-masked", run_with_uri(f"http://alice:{SECRET}@127.0.0.1:1"), 1,
         ("alice:***@127.0.0.1:1", "not reachable"), secret_never_printed),
    Case("run-tracking-database-driver-missing", run_with_uri(f"postgresql://alice:{SECRET}@127.0.0.1:1/mlflow"), 1,
         ("driver", "postgresql", "alice:***@"), secret_never_printed),
    # configuration refused before anything starts
    Case("run-blr-infinite", run_with("--set", "finetune.blr=.inf"), 2, ("finetune.blr", "finite"), no_workdir),
    Case("run-epochs-a-boolean", run_with("--set", "finetune.epochs=true"), 2, ("finetune.epochs", "integer"), no_workdir),
    Case("run-config-key-given-twice", duplicate_key_config, 2, ("twice.yaml", "'finetune' is given twice"), no_workdir),
    Case("run-model-name-mlflow-refuses", run_with("--set", "tracking.model_name=a/b"), 2, ("tracking.model_name", "'/'"), no_workdir),
    Case("run-model-name-flag-mlflow-refuses", run_with("--model-name", "a:b"), 2, ("tracking.model_name", "':'"), no_workdir),
    Case("run-train-split-smaller-than-a-batch", too_few_for_a_batch, 1, ("fewer than one pretrain batch", "batch_size"),
         no_training_started),
    Case("run-workdir-inside-source", workdir_inside_source, 2, ("--workdir", "overlaps --data"), source_untouched),
    Case("run-workdir-held-by-another-run", workdir_busy, 2, ("--workdir", "in use", "pid 1 on elsewhere"), busy_run_untouched),
    Case("run-dataset-json-without-classes", dataset_without_classes, 1, ("dataset.json", "lacks classes", "msmae ingest"),
         no_training_started),
    # ingest
    Case("ingest-file-name-not-utf8-is-quarantined", undecodable_name, 0, ("file_name_not_utf8",), undecodable_name_check),
    Case("ingest-verify-rebuilds-a-damaged-shard", damaged_shard, 0, ("do not match their digests", "rebuilding"), damaged_shard_repaired),
    Case("ingest-removes-a-killed-runs-staging-folder", killed_ingest_leftover, 0, (), stale_staging_removed),
    # predict --heatmaps
    Case("predict-heatmaps-into-the-input", heatmaps_into("input"), 2, ("--heatmaps", "overlaps --input"), inputs_untouched),
    Case("predict-heatmaps-inside-the-input", heatmaps_into("inside"), 2, ("--heatmaps", "overlaps --input"), inputs_untouched),
    Case("predict-heatmaps-into-a-users-folder", heatmaps_into("foreign"), 2, ("--heatmaps", "holding other files"), inputs_untouched),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    run_case(case, tmp_path, request)


def test_no_error_line_carries_a_password(tmp_path: Path) -> None:
    """Whatever raised it, the one error line masks a URI's password (here: the dead-server message)."""
    result = invoke(["run", image_folder(tmp_path / "src", {"a": 2, "b": 2}), "--workdir", tmp_path / "w",
                     "--tracking-uri", f"https://bob:{SECRET}@127.0.0.1:1/mlflow"])
    assert result.exit_code == 1 and SECRET not in result.output and "bob:***@" in result.output


# --- a full device, for real: /dev/full answers every write with ENOSPC ------------------------------

def test_a_checkpoint_write_on_a_full_disk_leaves_no_checkpoint(tmp_path: Path) -> None:
    import msmae
    from pipelines.checkpoint import is_checkpoint, write_checkpoint

    if not os.path.exists("/dev/full"):
        pytest.fail("/dev/full is missing: this test needs a Linux machine")
    model = msmae.build_classifier(msmae.get_preset("tiny", 32), 2, drop_path_rate=0.0)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / ".state.pt.partial").symlink_to("/dev/full")  # the partial file the writer opens is the full device
    with pytest.raises(OSError) as raised:
        write_checkpoint(folder, stage="finetune", model_state=model.state_dict(), optimizer_state={},
                         table=msmae.AttentionTable(4, model.preset.grid), epoch=0, best=None, preset=model.preset,
                         class_names=["a", "b"], metrics={}, config={})
    assert raised.value.errno == 28  # ENOSPC
    assert not is_checkpoint(folder) and not (folder / "state.pt").exists()
    assert sorted(p.name for p in folder.iterdir()) == []


def test_a_full_disk_ends_in_one_line_that_says_so() -> None:
    import errno

    from msmae_cli.errors import describe

    message, code = describe(OSError(errno.ENOSPC, "No space left on device", "/data/o/shards/train-00000.parquet"))
    assert code == 1 and message.startswith("no space left on device writing /data/o/shards/train-00000.parquet")
    wrapped = RuntimeError("(sqlite3.OperationalError) database or disk is full")
    assert describe(wrapped)[0].startswith("no space left on device")


# --- the tracking server goes away mid-run: training goes on, metrics follow --------------------------

def test_epoch_metrics_survive_a_store_outage_and_arrive_in_order(tmp_path: Path) -> None:
    """A real SQLite store taken away (its folder renamed) between epochs, then brought back."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import EpochLogger

    store = tmp_path / "store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("outage", artifact_location=(tmp_path / "a").as_uri())).info.run_id
    said: list[str] = []
    logger = EpochLogger(uri, run_id, "pretrain", say=said.append)
    logger.log({"epoch": 0, "train_loss": 1.0}, 0)
    store.rename(tmp_path / "away")  # the store is gone
    (tmp_path / "store").write_text("not a folder")  # and its path is unusable
    logger.log({"epoch": 1, "train_loss": 0.9}, 1)
    logger.log({"epoch": 2, "train_loss": 0.8}, 2)
    assert logger.pending and len([s for s in said if "unreachable" in s]) == 1  # said once, kept
    (tmp_path / "store").unlink()
    (tmp_path / "away").rename(store)  # back
    logger.log({"epoch": 3, "train_loss": 0.7}, 3)
    assert not logger.pending and any("reachable again" in s for s in said)
    history = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, "pretrain/train_loss"))
    assert history == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]


# --- a killed ingest leaves no decode process behind ------------------------------------------------

def test_a_killed_ingest_takes_its_decode_processes_with_it(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    src = image_folder(tmp_path / "src", {"a": 1500, "b": 1500})  # long enough to be killed while decoding
    proc = subprocess.Popen([str(Path(sys.executable).with_name("msmae")), "ingest", str(src), "--out", str(tmp_path / "o"),
                             "--no-progress", "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while len(workers) < 2:
        assert proc.poll() is None and time.time() < deadline, "ingest ended before its decode processes were seen"
        workers = _spawned_children(proc.pid)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while any(_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)], "decode processes outlived the killed ingest"


def _spawned_children(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` and that multiprocessing spawned (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its exit status is left for init to collect
