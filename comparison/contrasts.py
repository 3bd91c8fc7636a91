"""Which differences between the comparison's rows are real? Named contrasts, each isolating one choice.

The table ranks every row against the best, but the questions the controls were built for are
pairwise: attention vs uniform masking with the CLS term held, the CLS term with random masking
held, SAM fine-tuning vs all tokens after MSMAE pre-training, and so on. ``contrast_table`` answers
each with the same evidence: the mean over paired seeds of the test macro-F1 difference, the
difference seed by seed, the paired bootstrap interval over test images and McNemar's p
(``comparison.stats``). Each row runs at the learning rate its own grid chose (the grid sets
pre-training's rate for pre-trained rows), so two rows that share a pre-training recipe share its
weights only where they chose the same rate: a contrast compares the rows as each was tuned.

Two intervals, because two things vary: the image interval (bootstrap over test images, seeds
held fixed) says whether these runs differ on this test split; the seed interval (mean ± t ×
sd / √n over the per-seed differences) says whether training again would give the same sign.
With 3 seeds the t factor is 4.3, so only a difference large against its seed spread passes.
A difference **holds** when both intervals exclude 0, is **noise** when the image interval
includes 0, and is **seed-dependent** when the images show it but the seeds do not agree on it.
``curve_contrast_table`` asks the pre-training-length curve's questions the same way at each length.
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

from comparison.stats import McNemar, PairedDifference, mcnemar, paired_bootstrap

# (A, B, what A − B isolates), in the order a reader asks them; a contrast is shown where both rows ran.
CONTRASTS: tuple[tuple[str, str, str], ...] = (
    ("msmae_ft_all", "msmae_uniform_ft_all", "attention vs uniform pre-training masking (CLS term, all-token fine-tuning held)"),
    ("msmae_ft_all", "mae_cls", "attention masking vs MAE's random 75 % (CLS term held)"),
    ("mae_cls", "mae", "the CLS term in pre-training (random masking held)"),
    ("msmae_ft_all", "mae", "MSMAE pre-training vs MAE's, both fine-tuned on all tokens"),
    ("msmae", "msmae_ft_all", "SAM fine-tuning vs all tokens after MSMAE pre-training"),
    ("msmae_frozen_maps", "msmae", "SAM fine-tuning on the pre-training's maps vs maps refreshed while fine-tuning"),
    ("msmae_released", "msmae", "the released code's rule (uniform weights, softmax-CE CLS loss) vs the paper's"),
    ("msmae_ft_all", "supervised_eqflops", "MSMAE pre-training + fine-tuning vs a supervised ViT at equal training FLOPs"),
    ("mae", "supervised_eqflops", "MAE pre-training + fine-tuning vs a supervised ViT at about equal training FLOPs"),
    ("supervised", "supervised_eqflops", "the supervised ViT's full schedule vs its equal-FLOPs one"),
    ("resnet18", "supervised", "a CNN vs a ViT, both supervised from scratch on the same images and epochs"),
)


# The pre-training-length curve's questions at each length E: the three masking rules pairwise (the CLS term and
# all-token fine-tuning held), then each rule against the supervised ViT at the attention rule's FLOPs: whether
# pre-training pays at equal compute is a question for every rule, not only the one that wins.
CURVE_CONTRASTS: tuple[tuple[str, str, str], ...] = (
    *(c for c in CONTRASTS if c[:2] in {("msmae_ft_all", "msmae_uniform_ft_all"), ("msmae_ft_all", "mae_cls")}),
    ("msmae_uniform_ft_all", "mae_cls", "uniform vs random masking (CLS term held)"),
    *(c for c in CONTRASTS if c[:2] == ("msmae_ft_all", "supervised_eqflops")),
    ("msmae_uniform_ft_all", "supervised_eqflops", "uniform-rule pre-training + fine-tuning vs a supervised ViT at equal training FLOPs"),
    ("mae_cls", "supervised_eqflops", "random-rule pre-training + fine-tuning vs a supervised ViT at the attention rule's FLOPs (random spends up to 10 % more)"),
)


class Paired(NamedTuple):
    """Two rows' runs matched by seed on the same test images."""

    seeds: list[int]
    preds_a: list[list[int]]
    preds_b: list[list[int]]
    labels: list[list[int]]
    num_classes: int

    def bootstrap(self) -> PairedDifference:
        return paired_bootstrap(self.preds_a, self.preds_b, self.labels, self.num_classes)

    def mcnemar(self) -> McNemar:
        return mcnemar(self.preds_a, self.preds_b, self.labels)


def paired_runs(records_a: list[dict], records_b: list[dict]) -> Paired | None:
    """The seeds both rows ran with saved test predictions over the same labels (None if there are none)."""
    by_seed_a = {r["seed"]: r for r in records_a if r.get("predictions")}
    by_seed_b = {r["seed"]: r for r in records_b if r.get("predictions")}
    seeds = [s for s in sorted(set(by_seed_a) & set(by_seed_b))
             if by_seed_a[s]["predictions"]["test_label"] == by_seed_b[s]["predictions"]["test_label"]]
    if not seeds:
        return None
    return Paired(seeds, [by_seed_a[s]["predictions"]["test_pred"] for s in seeds], [by_seed_b[s]["predictions"]["test_pred"] for s in seeds],
                  [by_seed_a[s]["predictions"]["test_label"] for s in seeds], len(by_seed_a[seeds[0]]["classes"]))


def seed_interval(per_seed: list[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean per-seed difference (None below two seeds)."""
    if len(per_seed) < 2:
        return None
    from scipy.stats import t  # scipy comes with MLflow; only the report needs it

    mean = statistics.fmean(per_seed)
    half = float(t.ppf((1 + confidence) / 2, len(per_seed) - 1)) * statistics.stdev(per_seed) / len(per_seed) ** 0.5
    return mean - half, mean + half


def judge(interval: PairedDifference, seeds: tuple[float, float] | None) -> str:
    """holds / noise / seed-dependent (see the module doc); one seed cannot show agreement."""
    if interval.low <= 0 <= interval.high:
        return "noise"
    if seeds is None:
        return "one seed"
    return "seed-dependent" if seeds[0] <= 0 <= seeds[1] else "holds"


_HEAD = ("Contrasts (test macro-F1, A − B on paired seeds): mean ± sd of the per-seed differences, each seed's, the 95 % "
         "paired bootstrap interval over test images (seeds held fixed), the 95 % t interval over seeds, McNemar's exact p; "
         "**holds**: both intervals exclude 0, **noise**: the image interval includes 0, **seed-dependent**: the images "
         "show a difference the seeds do not agree on, **one seed**: the images show one the seeds cannot yet confirm.")
_COLUMNS = "| A − B | what it isolates | seeds | Δ mean ± sd | Δ per seed | 95 % CI (images) | 95 % CI (seeds) | McNemar p | verdict |"


def contrast_cells(a: str, b: str, question: str, rows: dict[str, dict]) -> str | None:
    """One contrast's table cells, from "A − B" to the verdict (None unless both rows ran on paired seeds)."""
    if a not in rows or b not in rows:
        return None
    paired = paired_runs(rows[a]["records"], rows[b]["records"])
    if paired is None:
        return None
    f1 = {name: {r["seed"]: r["test"]["macro_f1"] for r in rows[name]["records"]} for name in (a, b)}
    per_seed = [f1[a][s] - f1[b][s] for s in paired.seeds]
    interval, test, seeds = paired.bootstrap(), paired.mcnemar(), seed_interval(per_seed)
    spread = f" ± {statistics.stdev(per_seed):.3f}" if len(per_seed) > 1 else ""
    return (f"| {a} − {b} | {question} | {len(paired.seeds)} | {statistics.fmean(per_seed):+.3f}{spread} | "
            + ", ".join(f"{d:+.3f}" for d in per_seed)
            + f" | [{interval.low:+.3f}, {interval.high:+.3f}] | " + (f"[{seeds[0]:+.3f}, {seeds[1]:+.3f}]" if seeds else "—")
            + f" | {test.p_exact:.3g} | **{judge(interval, seeds)}** |")


def contrast_table(rows: dict[str, dict]) -> str | None:
    """The markdown table of every contrast whose two rows ran (``rows``: row name → its runs under "records")."""
    lines = [cells for a, b, question in CONTRASTS if (cells := contrast_cells(a, b, question, rows))]
    if not lines:
        return None
    return "\n".join([_HEAD, "", _COLUMNS, "|---|---|---:|---:|---|---|---|---:|---|", *lines])


def curve_contrast_table(by_length: dict[int, dict[str, dict]]) -> str | None:
    """The curve's contrasts at each pre-training length E (``by_length``: E → row name → its runs under "records"),
    so a gap between two rules is judged at every point rather than read off the curve's means."""
    lines = [f"| {e} " + cells for e in sorted(by_length) for a, b, question in CURVE_CONTRASTS
             if (cells := contrast_cells(a, b, question, by_length[e]))]
    if not lines:
        return None
    return "\n".join([_HEAD, "", "| E " + _COLUMNS, "|---:|---|---|---:|---:|---|---|---|---:|---|", *lines])
