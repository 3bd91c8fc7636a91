"""benchmarks/compare.py: the run mode end to end on CPU, the time budget, the tables, MLflow logging."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "comparison"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load("compare_cli", REPO / "benchmarks" / "compare.py")
import comparison.stats as compare_stats  # noqa: E402
# the comparison tests' autouse fixture (one CPU thread per test), applied here too
_one_cpu_thread = _load("comparison_conftest", REPO / "tests" / "comparison" / "conftest.py")._one_cpu_thread


@pytest.fixture(scope="module")
def cmp_bundle(tmp_path_factory) -> Path:
    from test_runner import _synthetic_bundle

    from comparison.bundle import save_bundle

    bundle, _ = _synthetic_bundle()
    return save_bundle(bundle, tmp_path_factory.mktemp("cmp") / "synthetic.pt")


TINY = ["--preset", "tiny", "--img-size", "32", "--patch-size", "8", "--batch-size", "16", "--eval-batch-size", "32",
        "--pretrain-epochs", "2", "--finetune-epochs", "1", "--sam-start", "1", "--refresh-every", "1",
        "--finetune-refresh-every", "1", "--device", "cpu"]


def test_run_mode_writes_one_line_per_run_seed_major_and_reports(cmp_bundle, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    compare.main(["--bundle", str(cmp_bundle), "--out", str(out), "--methods", "supervised", "msmae", "--seeds", "0", "1", *TINY])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["seed"], r["method"]) for r in records] == [(0, "supervised"), (0, "msmae"), (1, "supervised"), (1, "msmae")]
    assert {r["session"] for r in records} == {records[0]["session"]}
    assert {r["threads"] for r in records} == {1}  # the autouse fixture's one thread, kept to read wall times by
    assert all(r["dataset"] == "synthetic" and r["device"] == "cpu" and r["recipe"]["pretrain_epochs"] == 2 for r in records)
    printed = capsys.readouterr().out
    assert "[synthetic msmae s1] finetune 1/1 sam" in printed and "| msmae | 2 |" in printed

    compare.main(["report", str(out), "--out", str(tmp_path / "t.md")])
    table = (tmp_path / "t.md").read_text()
    f1 = [r["test"]["macro_f1"] for r in records if r["method"] == "msmae"]
    mean, sd = sum(f1) / 2, abs(f1[0] - f1[1]) / 2**0.5
    row = next(line for line in table.splitlines() if line.startswith("| msmae |"))
    assert f"{mean:.3f} ± {sd:.3f}" in row.split("|")[5]


def test_time_budget_stops_before_runs_that_would_not_fit(cmp_bundle, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    compare.main(["--bundle", str(cmp_bundle), "--out", str(out), "--methods", "supervised", "msmae", "--seeds", "0", *TINY,
                  "--time-budget", "0.5"])
    printed = capsys.readouterr().out
    assert "stopping before 2 runs" in printed and "not run (time budget)" in printed
    assert not out.exists() or out.read_text() == ""


def _record(method: str, seed: int, f1: float, dataset: str = "d", epochs: int = 3) -> dict:
    metrics = {"accuracy": f1, "balanced_accuracy": f1, "macro_f1": f1, "macro_auc": 0.5, "loss": 1.0}
    return {"method": method, "seed": seed, "dataset": dataset, "device": "cpu", "counts": {"train": 1, "val": 1, "test": 1},
            "recipe": {"preset": "tiny", "img_size": 32, "patch_size": 8, "batch_size": 16, "pretrain_epochs": epochs, "finetune_epochs": epochs},
            "selected_epoch": 0, "wall_seconds": 1.0, "val": metrics, "test": metrics, "session": "s1",
            "pretrain_epochs": epochs, "finetune_epochs": epochs, "image_passes": 2 * epochs, "pretrain_curve": [],
            "finetune_curve": [{"epoch": 0, "train_loss": 1.0, "val_macro_f1": f1}], "pretrain_seconds": 0.0, "finetune_seconds": 1.0}


def test_tables_keep_datasets_and_settings_apart():
    records = [_record("msmae", 0, 0.5), _record("msmae", 1, 0.7), _record("msmae", 0, 0.9, epochs=5), _record("mae", 0, 0.1, dataset="e")]
    text = compare.markdown_tables(records)
    assert text.count("| method |") == 3
    assert "| msmae | 2 | 0.600 ± 0.141 |" in text and "| msmae | 1 | 0.900 |" in text and "| mae | 1 | 0.100 |" in text


def test_rows_keep_the_order_methods_first_ran_in_when_a_grid_value_added_later_wins():
    def grid_run(method: str, blr: float, val: float) -> dict:
        r = _record(method, 0, val)
        return r | {"lr_selection": {"grid": [1e-3, 4e-3], "seed": 0}, "tuned_lr": {"field": "finetune_blr", "blr": blr, "from_grid": True}}

    records = [grid_run("supervised", 1e-3, 0.6), grid_run("resnet18", 1e-3, 0.7), grid_run("mae", 1e-3, 0.5),
               grid_run("resnet18", 4e-3, 0.8)]  # the later grid value, appended last, is resnet18's choice
    rows = [line.split(" | ")[0] for line in compare.markdown_tables(records).splitlines() if line.startswith("| ") and " | 1 | " in line]
    assert rows == ["| supervised", "| resnet18", "| mae"]


def test_verdict_names_the_winner_and_measures_margins_in_seed_sds():
    records = [_record("mae", s, f1) for s, f1 in enumerate([0.50, 0.52, 0.54])]
    records += [_record("msmae", s, f1) for s, f1 in enumerate([0.60, 0.70, 0.80])]
    text = compare.markdown_tables(records)
    # msmae − mae = 0.70 − 0.52 = 0.18; the larger sd is msmae's 0.1
    assert "Best test macro-F1: msmae; ahead of mae by +0.180 (1.8 × the larger seed sd); msmae − mae: +0.180 (1.8 × the larger seed sd)." in text
    single = compare.markdown_tables([_record("mae", 0, 0.3), _record("msmae", 0, 0.2)])
    assert "Best test macro-F1: mae; ahead of msmae by +0.100 (no seed spread to judge it by); msmae − mae: -0.100" in single


def test_report_logs_each_run_once_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    results = tmp_path / "r.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in [_record("msmae", 0, 0.5), _record("mae", 0, 0.4)]) + '{"cut off')
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    compare.main(["report", str(results), "--mlflow-uri", uri])
    compare.main(["report", str(results), "--mlflow-uri", uri])  # a second report adds nothing
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("compare-d")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["mae-seed0", "msmae-seed0", "summary"]
    msmae_run = next(r for r in runs if r.info.run_name == "msmae-seed0")
    assert msmae_run.data.metrics["test_macro_f1"] == pytest.approx(0.5)
    assert msmae_run.data.params["recipe.pretrain_epochs"] == "3" and msmae_run.data.tags["device"] == "cpu"
    assert [m.value for m in client.get_metric_history(msmae_run.info.run_id, "finetune/val_macro_f1")] == [0.5]


def test_pretraining_saved_by_one_command_is_fine_tuned_by_the_next(cmp_bundle, tmp_path, capsys):
    """--stage pretrain then the same command without it (a GPU box's 10-minute calls): the second
    finds the encoder on disk and gives the record a single command would have given."""
    saved = tmp_path / "pretrained"
    args = ["--bundle", str(cmp_bundle), "--methods", "msmae_ft_all", "--seeds", "0", *TINY]
    compare.main([*args, "--out", str(tmp_path / "unused.jsonl"), "--stage", "pretrain", "--pretrained-dir", str(saved)])
    assert len(list(saved.glob("pretrain-*.pt"))) == 1 and not (tmp_path / "unused.jsonl").exists()
    assert "saved in" in capsys.readouterr().out
    compare.main([*args, "--out", str(tmp_path / "two.jsonl"), "--pretrained-dir", str(saved)])
    compare.main([*args, "--out", str(tmp_path / "one.jsonl")])
    two, one = (json.loads((tmp_path / f).read_text()) for f in ("two.jsonl", "one.jsonl"))
    assert two["pretrain_shared"] and not one["pretrain_shared"]
    assert [r["train_loss"] for r in two["pretrain_curve"]] == [r["train_loss"] for r in one["pretrain_curve"]]
    assert two["test"] == pytest.approx(one["test"]) and two["selected_epoch"] == one["selected_epoch"]
    with pytest.raises(SystemExit, match="--pretrained-dir"):
        compare.main([*args, "--out", str(tmp_path / "x.jsonl"), "--stage", "pretrain"])


def test_a_rerun_skips_finished_runs_and_the_grid_chooses_on_validation(cmp_bundle, tmp_path, capsys):
    """--lr-grid: every method at every value on the selection seed, the other seeds at the chosen
    one; the same command again finds every run in --out and trains nothing."""
    out = tmp_path / "g.jsonl"
    args = ["--bundle", str(cmp_bundle), "--out", str(out), "--methods", "supervised", "mae_cls", "--seeds", "0", "1", *TINY,
            "--lr-grid", "1e-4", "3e-3"]
    compare.main(args)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["seed"], r["tuned_lr"]["blr"]) for r in records[:4]] == [
        ("supervised", 0, 1e-4), ("supervised", 0, 3e-3), ("mae_cls", 0, 1e-4), ("mae_cls", 0, 3e-3)]
    for method, field in (("supervised", "finetune_blr"), ("mae_cls", "pretrain_blr")):
        grid = {r["tuned_lr"]["blr"]: r["val"]["macro_f1"] for r in records[:4] if r["method"] == method}
        chosen = max(grid, key=lambda lr: (grid[lr], -list(grid).index(lr)))
        later = next(r for r in records if r["method"] == method and r["seed"] == 1)
        assert later["recipe"][field] == chosen and later["tuned_lr"]["from_grid"]
        assert compare.chosen_lr(records, method) == chosen  # what cpu_pretrain_curve.sh reads (`compare.py chosen-lr`)
    assert len(records) == 6 and all(r["lr_selection"] == {"grid": [1e-4, 3e-3], "seed": 0} for r in records)
    with pytest.raises(ValueError, match=r"grid of mae_cls has not finished on seed 0: blr \[0.003\]"):
        compare.chosen_lr(records[:3], "mae_cls")
    with pytest.raises(ValueError, match="no learning-rate grid run of msmae"):
        compare.chosen_lr(records, "msmae")
    capsys.readouterr()
    compare.main(["chosen-lr", str(out), "mae_cls"])
    assert float(capsys.readouterr().out) == compare.chosen_lr(records, "mae_cls")
    capsys.readouterr()
    compare.main(args)
    assert len(out.read_text().splitlines()) == 6  # nothing appended
    printed = capsys.readouterr().out
    assert "6 runs were already in" in printed and "Learning-rate grid" in printed
    # the table reports the chosen rate's runs only: two seeds per method
    assert "| supervised | 2 |" in printed and "| mae_cls | 2 |" in printed


def test_report_pairs_seeds_for_the_ci_and_mcnemar_and_shows_compute():
    def run(method: str, seed: int, preds: list[int]) -> dict:
        r = _record(method, seed, 0.0)
        labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 4
        f1 = compare_stats.macro_f1(np.array(preds), np.array(labels), 3)
        r["test"] = {**r["test"], "macro_f1": f1}
        r.update(classes=["a", "b", "c"], train_flops=2e15, predictions={"test_pred": preds, "test_label": labels})
        return r

    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 4
    worse = [(y if i % 4 else (y + 1) % 3) for i, y in enumerate(labels)]  # wrong on every 4th image
    records = [run("msmae", s, labels) for s in (0, 1)] + [run("mae", s, worse) for s in (0, 1)]
    text = compare.markdown_tables(records)
    row = next(line for line in text.splitlines() if line.startswith("| mae |"))
    diff = compare_stats.paired_bootstrap([worse] * 2, [labels] * 2, [labels] * 2, 3)
    test = compare_stats.mcnemar([worse] * 2, [labels] * 2, [labels] * 2)
    assert (test.b, test.c) == (0, 20)
    assert f"{diff} | {test.p_exact:.3g} / {test.p_mid:.3g}" in row and diff.high < 0
    assert "| 2 | 3 + 3 |" in row  # train PFLOPs, epochs
    assert "best | —" in next(line for line in text.splitlines() if line.startswith("| msmae |"))


def test_map_sources_are_rows_of_their_own_and_every_rule_is_scored_on_the_lesion_masks(tmp_path, capsys):
    """Issue 29's comparison: the attention rule with two map sources and the uniform rule, each pre-trained encoder's
    maps scored against the validation lesion masks; a source other than the paper's is a row of its own."""
    from test_lesion_runner import _bundle_with_masks

    from comparison.bundle import save_bundle

    bundle, _ = _bundle_with_masks()
    path = save_bundle(bundle, tmp_path / "lesions.pt")
    out = tmp_path / "r.jsonl"
    common = ["--bundle", str(path), "--out", str(out), "--seeds", "0", *TINY, "--lesion-sources", "cls_attention", "rollout", "grad_attention"]
    compare.main([*common, "--methods", "msmae_ft_all", "msmae_uniform_ft_all"])
    compare.main([*common, "--methods", "msmae_ft_all", "--map-source", "rollout"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["recipe"]["map_source"]) for r in records] == [
        ("msmae_ft_all", "cls_attention"), ("msmae_uniform_ft_all", "cls_attention"), ("msmae_ft_all", "rollout")]
    for r in records:  # the uniform rule never refreshes maps, yet its encoder is scored like the others
        for source in ("cls_attention", "rollout", "grad_attention"):
            assert 0.0 <= r["pretrain_lesion"][f"{source}/lesion_auroc"] <= 1.0
    assert records[0]["pretrain_lesion"] != records[1]["pretrain_lesion"]
    text = compare.markdown_tables(records)
    assert text.count("| msmae_ft_all |") == 1 + 3 + 3 and "| msmae_ft_all [rollout] | 1 |" in text
    sources = ("cls_attention", "rollout", "grad_attention")
    lesion = [line for line in text.splitlines() if line.startswith("| msmae_uniform_ft_all | 1 | ") and line.split(" | ")[2] in sources]
    assert [line.split(" | ")[2] for line in lesion] == list(sources)
    auroc = records[1]["pretrain_lesion"]["rollout/lesion_auroc"]
    assert f"| {auroc:.3f} |" in lesion[1]
    best = max(c["val_cls_balanced_accuracy"] for c in records[1]["pretrain_curve"])
    assert lesion[0].endswith(f"| {best:.3f} | {records[1]['pretrain_curve'][-1]['val_cls_balanced_accuracy']:.3f} |")
    scored = [c["epoch"] for c in records[1]["pretrain_curve"] if "rollout/lesion_auroc" in c]  # the uniform rule, never refreshed
    assert scored == [0, 1] and not any(c["maps_refreshed"] for c in records[1]["pretrain_curve"])
    curve_row = next(line for line in text.splitlines() if line.startswith("| msmae_uniform_ft_all | rollout | "))
    assert curve_row.rstrip(" |").split(" | ")[2:4] == [f"{c['rollout/lesion_auroc']:.3f}" for c in records[1]["pretrain_curve"]]


def test_the_curve_table_shows_each_length_and_judges_the_rules_there():
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 4
    worse = [(y if i % 4 else (y + 1) % 3) for i, y in enumerate(labels)]  # wrong on every 4th image

    def point(method: str, e: int | None, preds: list[int], pretrain_epochs: int = 400) -> dict:
        r = _record(method, 0, compare_stats.macro_f1(np.array(preds), np.array(labels), 3), epochs=pretrain_epochs)
        r["recipe"]["finetune_epochs"] = 10  # one curve: every point fine-tunes 10 epochs
        r.update(classes=["a", "b", "c"], pretrain_checkpoint_epoch=e, predictions={"test_pred": preds, "test_label": labels})
        return r

    records = [point("msmae_ft_all", 50, worse), point("msmae_uniform_ft_all", 50, labels),
               point("msmae_ft_all", 400, labels), point("supervised_eqflops", None, worse, pretrain_epochs=50)]
    text = compare.markdown_tables(records)
    f1_worse = compare_stats.macro_f1(np.array(worse), np.array(labels), 3)
    assert f"| msmae_ft_all | {f1_worse:.3f} | 1.000 |" in text  # E = 50, E = 400
    assert f"| supervised_eqflops (FLOPs of E + fine-tuning) | {f1_worse:.3f} | — |" in text  # joins the curve at its E
    contrasts = [line for line in text.splitlines() if line.startswith(("| 50 |", "| 400 |"))]
    assert [line.split(" | ")[1] for line in contrasts] == ["msmae_ft_all − msmae_uniform_ft_all", "msmae_ft_all − supervised_eqflops",
                                                            "msmae_uniform_ft_all − supervised_eqflops"]
    assert contrasts[0].endswith("| **one seed** |") and contrasts[1].endswith("| **noise** |")  # same predictions: no gap
    assert contrasts[2].endswith("| **one seed** |")
