"""Issue 18: ``msmae predict`` as Ray Data batch inference — listing in tasks, an actor pool, Parquet shards.

Real Ray (the session's ``ray_local``), a random-weight checkpoint, files generated in ``tmp_path``.
The command-line cases (every file a row through ``msmae predict``) are in ``test_reliability.py``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from bad_inputs import bomb_png, checkpoint_folder, fifo, image_folder, symlink, text, write_image

from pipelines.outputs import OutputPathError
from pipelines.serve.predict import MARKER, PredictSettings, check_predictions_out, pool_for_cluster, predict_folder
from pipelines.data.sources import scan_tree


def test_the_pool_is_sized_to_the_cluster() -> None:
    """One actor per GPU (autoscaling from one) on a GPU cluster, one per 4 CPUs without; a setting wins."""
    gpu = pool_for_cluster(PredictSettings(), {"CPU": 64.0, "GPU": 8.0})
    assert (gpu.min_actors, gpu.max_actors, gpu.gpus_per_actor) == (1, 8, 1.0)
    half = pool_for_cluster(PredictSettings(gpus_per_actor=0.5), {"CPU": 64.0, "GPU": 8.0})
    assert (half.max_actors, half.gpus_per_actor) == (16, 0.5)
    cpu = pool_for_cluster(PredictSettings(), {"CPU": 32.0})
    assert (cpu.min_actors, cpu.max_actors, cpu.gpus_per_actor) == (1, 8, 0.0)
    assert pool_for_cluster(PredictSettings(), {"CPU": 2.0}).max_actors == 1
    fixed = pool_for_cluster(PredictSettings(actors=3), {"CPU": 32.0, "GPU": 8.0})
    assert (fixed.min_actors, fixed.max_actors) == (3, 3)
    with pytest.raises(ValueError, match="batch-size"):
        PredictSettings(batch_size=0)


def test_listing_in_tasks_matches_the_walk_on_the_driver(ray_local, tmp_path: Path) -> None:
    """The tree listed by Ray read tasks (a few names per task) is scan_tree's listing: every file once, loops and
    broken links as rows, a link back to the root a loop rather than a second walk of the whole tree."""
    import ray

    from pipelines.data.folder_datasource import FolderListing

    root = tmp_path / "in"
    image_folder(root, {"a": 3, "b": 2})
    for k in range(7):
        text(root / f"top_{k}.txt", "x")
    symlink(root / "a" / "up", root)  # inside a sub-folder: back to the root
    symlink(root / "self", root)
    symlink(root / "gone", tmp_path / "nowhere")
    fifo(root / "b" / "pipe")
    listing = FolderListing(root, names_per_task=2)
    assert len(listing.get_read_tasks(1)) == -(-len(listing.names) // 2)
    rows = ray.data.read_datasource(listing).take_all()  # a few rows; the real pipeline never collects
    got = {(Path(r["path"]).relative_to(root).as_posix(), r["problem"]) for r in rows}
    assert got == {(e.rel, e.problem) for e in scan_tree(root)}
    assert ("a/up", "symlink_loop") in got and ("self", "symlink_loop") in got and ("b/pipe", "not_a_regular_file") in got
    assert listing.count() == len(rows)  # predict's progress total, counted on the driver


def test_multi_actor_predict_writes_every_file_once_as_parquet_shards(ray_local, tmp_path: Path, capsys) -> None:
    """Two scoring actors, small batches, small shards: every file is one row (failures with a reason and null
    probabilities), the shards are Ray Data's, the summary is counted from them, and a re-run replaces the folder whole."""
    model = checkpoint_folder(tmp_path / "model", ["x", "y", "z"])
    incoming = image_folder(tmp_path / "in", {"a": 20, "b": 19})
    bomb_png(incoming / "bomb.png")
    write_image(incoming / "big.png", size=(300, 300))  # over the size limit below: a row, never read
    text(incoming / "a" / "junk.jpg", "not a jpeg")
    (incoming / "empty.png").write_bytes(b"")
    out = tmp_path / "preds"
    settings = PredictSettings(batch_size=4, actors=2, rows_per_file=8, max_file_bytes=20_000)
    summary = predict_folder(str(model), incoming, out, settings)

    table = pq.read_table(out)
    assert table.column_names == ["path", "predicted_class", "ok", "reason", "detail", "seen_in_training", "prob_x", "prob_y", "prob_z"]
    rows = table.to_pylist()
    assert all(r["seen_in_training"] is None for r in rows)  # a checkpoint made by hand carries no training fingerprints
    names = Counter(Path(r["path"]).relative_to(incoming).as_posix() for r in rows)
    assert set(names) == {e.rel for e in scan_tree(incoming)} and set(names.values()) == {1}
    failed = {Path(r["path"]).name: r for r in rows if not r["ok"]}
    assert {k: r["reason"] for k, r in failed.items()} == {
        "bomb.png": "too_large", "big.png": "too_large", "junk.jpg": "not_an_image", "empty.png": "zero_byte"}
    assert "above predict's limit of 20000" in failed["big.png"]["detail"]
    assert all(r["predicted_class"] is None and r["prob_x"] is None for r in failed.values())
    good = [r for r in rows if r["ok"]]
    assert len(good) == 39 and all(abs(r["prob_x"] + r["prob_y"] + r["prob_z"] - 1) < 1e-4 for r in good)
    assert all(r["predicted_class"] == max("xyz", key=lambda c: r[f"prob_{c}"]) for r in good)

    shards = sorted(out.glob("*.parquet"))
    assert len(shards) == summary["shards"] >= 2
    assert summary["images"] == 43 and summary["unreadable"] == 4 and summary["pool"]["max_actors"] == 2
    assert json.loads((out / MARKER).read_text())["reasons"] == {"too_large": 2, "not_an_image": 1, "zero_byte": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    # progress over both actors' rows: the closing line counts every file (plain lines: stdout is not a terminal)
    assert re.search(r"^predict: 43 files in \d\d:\d\d \(\d+\.\d files/s\)$", capsys.readouterr().out, re.M)

    (incoming / "b" / "b_0.png").unlink()
    again = predict_folder(str(model), incoming, out, settings)  # an earlier predictions folder is replaced whole
    assert again["images"] == 42 and pq.read_table(out).num_rows == 42
    assert not set(p.name for p in shards) & set(p.name for p in out.glob("*.parquet"))


def test_out_must_be_new_empty_or_earlier_predictions(tmp_path: Path) -> None:
    check_predictions_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_predictions_out(tmp_path / "empty")
    text(tmp_path / "earlier" / MARKER, "{}")
    check_predictions_out(tmp_path / "earlier")
    text(tmp_path / "theirs" / "notes.txt", "x")
    with pytest.raises(OutputPathError, match="holding other files"):
        check_predictions_out(tmp_path / "theirs")
    with pytest.raises(OutputPathError, match="is a file"):
        check_predictions_out(tmp_path / "theirs" / "notes.txt")


def test_evaluate_scores_a_large_split_on_actors_with_the_drivers_numbers(ray_local, data_sample_ingested: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Above SCORE_ON_ACTORS_FROM images a split is scored by an actor pool; the report is the driver's, number for number."""
    import torch

    import pipelines.serve.actor_pool
    from pipelines.checkpoint import load_classifier
    from pipelines.data.dataset import IngestedDataset
    from pipelines.serve.evaluate import evaluate_split

    names = IngestedDataset.load(data_sample_ingested).class_names
    model, _ = load_classifier(checkpoint_folder(tmp_path / "model", names))
    on_driver, probs, labels = evaluate_split(model, IngestedDataset.load(data_sample_ingested), "val")
    monkeypatch.setattr(pipelines.serve.actor_pool, "SCORE_ON_ACTORS_FROM", 0)
    on_actors, actor_probs, actor_labels = evaluate_split(model, IngestedDataset.load(data_sample_ingested), "val")
    order, actor_order = torch.argsort(labels, stable=True), torch.argsort(actor_labels, stable=True)
    assert torch.equal(labels[order], actor_labels[actor_order]) and len(labels) == on_driver.num_samples
    assert on_actors.num_samples == on_driver.num_samples
    assert abs(on_actors.accuracy - on_driver.accuracy) < 1e-9 and abs(on_actors.macro_auc - on_driver.macro_auc) < 1e-6
    assert torch.allclose(torch.sort(actor_probs.flatten()).values, torch.sort(probs.flatten()).values, atol=1e-6)
