"""comparison.contrasts: the named A − B questions, judged by the images and the seeds together."""

from __future__ import annotations

import numpy as np

from comparison.contrasts import contrast_table, curve_contrast_table, judge, paired_runs, seed_interval
from comparison.stats import PairedDifference, macro_f1

LABELS = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0] * 4


def _wrong_every(k: int) -> list[int]:
    """Right except on every k-th image (k = 0: right everywhere)."""
    return [(y + 1) % 3 if k and i % k == 0 else y for i, y in enumerate(LABELS)]


def _row(per_seed_preds: list[list[int]]) -> dict:
    records = [{"seed": seed, "classes": ["a", "b", "c"], "predictions": {"test_pred": preds, "test_label": LABELS},
                "test": {"macro_f1": macro_f1(np.array(preds), np.array(LABELS), 3)}} for seed, preds in enumerate(per_seed_preds)]
    return {"records": records}


def _line(table: str, contrast: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {contrast} |"))


def test_each_contrast_is_judged_by_its_interval_and_its_seeds():
    rows = {
        "msmae_ft_all": _row([_wrong_every(0)] * 3),
        "msmae_uniform_ft_all": _row([_wrong_every(4)] * 3),  # worse in every seed: holds
        "mae_cls": _row([_wrong_every(2), _wrong_every(2), _wrong_every(0)]),  # worse in two seeds, level in the third
        "mae": _row([_wrong_every(2), _wrong_every(2), _wrong_every(0)]),  # the same predictions as mae_cls: no difference
    }
    table = contrast_table(rows)
    assert _line(table, "msmae_ft_all − msmae_uniform_ft_all").endswith("| **holds** |")
    assert _line(table, "msmae_ft_all − mae_cls").endswith("| **seed-dependent** |")  # the seed interval crosses 0
    assert _line(table, "mae_cls − mae").endswith("| **noise** |")
    assert "| 3 | +0.000 ± 0.000 | +0.000, +0.000, +0.000 | [+0.000, +0.000] | [+0.000, +0.000] |" in _line(table, "mae_cls − mae")
    assert "msmae − msmae_ft_all" not in table  # msmae did not run
    assert "| mae − supervised_eqflops |" not in table  # its control did not run
    with_supervised = contrast_table({**rows, "supervised_eqflops": _row([_wrong_every(0)] * 3)})
    assert _line(with_supervised, "mae − supervised_eqflops").endswith("| **seed-dependent** |")  # MAE pre-training at equal FLOPs is asked too
    uniform = _line(table, "msmae_ft_all − msmae_uniform_ft_all")
    gap = 1 - rows["msmae_uniform_ft_all"]["records"][0]["test"]["macro_f1"]
    assert f"| {gap:+.3f} ± 0.000 | {gap:+.3f}, {gap:+.3f}, {gap:+.3f} |" in uniform
    assert f"| [{gap:+.3f}, {gap:+.3f}] | {2 * 0.5 ** 30:.3g} |" in uniform  # no seed spread: the seed interval is the point;
    # McNemar: 10 of 40 images wrong in each of 3 seeds, all 30 discordant pairs one way


def test_runs_pair_only_on_seeds_both_rows_ran_over_the_same_labels():
    a = _row([_wrong_every(0)] * 3)["records"]
    b = _row([_wrong_every(4)] * 2)["records"]  # seeds 0 and 1 only
    b[1] = {**b[1], "predictions": {"test_pred": b[1]["predictions"]["test_pred"], "test_label": _wrong_every(3)}}  # another test split
    paired = paired_runs(a, b)
    assert paired.seeds == [0] and paired.num_classes == 3
    assert paired_runs(a, [{**r, "predictions": None} for r in b]) is None
    assert contrast_table({"msmae_ft_all": {"records": a}}) is None  # no contrast has both rows


def test_the_verdict_needs_the_image_interval_and_the_seed_interval():
    positive = PairedDifference(0.05, 0.01, 0.09, 3, 40, 100)
    assert judge(positive, seed_interval([0.04, 0.05, 0.06])) == "holds"  # ± 4.30 × 0.01 / √3 = ± 0.025
    assert judge(positive, seed_interval([0.02, 0.05, 0.08])) == "seed-dependent"  # ± 0.075: crosses 0
    assert judge(positive, seed_interval([0.12, 0.05, -0.02])) == "seed-dependent"
    assert judge(PairedDifference(0.02, -0.01, 0.05, 3, 40, 100), seed_interval([0.02, 0.02, 0.02])) == "noise"
    assert judge(PairedDifference(-0.05, -0.09, -0.01, 1, 40, 100), seed_interval([-0.05])) == "one seed"
    low, high = seed_interval([0.02, 0.05, 0.08])
    assert abs(low - (0.05 - 4.302653 * 0.03 / 3 ** 0.5)) < 1e-5 and abs(high + low - 0.10) < 1e-12


def test_the_curve_is_judged_rule_against_rule_at_each_pre_training_length():
    by_length = {
        400: {"msmae_ft_all": _row([_wrong_every(0)]), "msmae_uniform_ft_all": _row([_wrong_every(0)])},  # level
        50: {"msmae_ft_all": _row([_wrong_every(0)]), "msmae_uniform_ft_all": _row([_wrong_every(4)]),
             "mae_cls": _row([_wrong_every(4)])},  # attention ahead of both; uniform and random identical
    }
    lines = [line for line in curve_contrast_table(by_length).splitlines() if line.startswith(("| 50 |", "| 400 |"))]
    assert [line.split(" | ")[:2] for line in lines] == [
        ["| 50", "msmae_ft_all − msmae_uniform_ft_all"], ["| 50", "msmae_ft_all − mae_cls"],
        ["| 50", "msmae_uniform_ft_all − mae_cls"], ["| 400", "msmae_ft_all − msmae_uniform_ft_all"]]  # by E, then the questions' order
    assert [line.rsplit(" | ", 1)[1] for line in lines] == ["**one seed** |", "**one seed** |", "**noise** |", "**noise** |"]
    assert "| 1 | +0.000 | +0.000 | [+0.000, +0.000] | — |" in lines[2]  # one seed: no seed interval
    assert curve_contrast_table({50: {"msmae_ft_all": _row([_wrong_every(0)])}}) is None  # nothing to pair
    # every rule is asked against the supervised ViT at its FLOPs, not only the attention rule
    against_supervised = {50: {"supervised_eqflops": _row([_wrong_every(4)]), "msmae_uniform_ft_all": _row([_wrong_every(0)]),
                               "mae_cls": _row([_wrong_every(4)])}}
    lines = [line for line in curve_contrast_table(against_supervised).splitlines() if line.startswith("| 50 |")]
    assert [line.split(" | ")[1] for line in lines] == [
        "msmae_uniform_ft_all − mae_cls", "msmae_uniform_ft_all − supervised_eqflops", "mae_cls − supervised_eqflops"]
    assert [line.rsplit(" | ", 1)[1] for line in lines] == ["**one seed** |", "**one seed** |", "**noise** |"]
