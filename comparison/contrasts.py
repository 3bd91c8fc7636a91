"""Which differences between the comparison's rows are real? Named contrasts, each isolating one choice.

The table ranks every row against the best, but the questions the controls were built for are
pairwise: attention vs uniform masking with the CLS term held, the CLS term with random masking
held, SAM fine-tuning vs all tokens on one pre-training, and so on. ``contrast_table`` answers
each with the same evidence: the mean over paired seeds of the test macro-F1 difference, the
difference seed by seed, the paired bootstrap interval over test images and McNemar's p
(``comparison.stats``). Each row runs at the learning rate its own grid chose (the grid sets
pre-training's rate for pre-trained rows), so two rows that share a pre-training recipe share its
weights only where they chose the same rate: a contrast compares the rows as each was tuned.

The image interval holds the seeds fixed, so on its own it overstates certainty when the seeds
disagree; the verdict therefore asks both: a difference **holds** when its interval excludes 0
and every seed has its sign, is **noise** when the interval includes 0, and is
**seed-dependent** otherwise (the images say it is there, the seeds do not agree).
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
    ("supervised", "supervised_eqflops", "the supervised ViT's full schedule vs its equal-FLOPs one"),
    ("resnet18", "supervised", "a CNN vs a ViT, both supervised from scratch on the same images and epochs"),
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


def judge(interval: PairedDifference, per_seed: list[float]) -> str:
    """holds / noise / seed-dependent (see the module doc); one seed cannot show agreement."""
    if interval.low <= 0 <= interval.high:
        return "noise"
    if len(per_seed) < 2:
        return "one seed"
    sign = 1 if interval.diff > 0 else -1
    return "holds" if all(d * sign > 0 for d in per_seed) else "seed-dependent"


def contrast_table(rows: dict[str, dict]) -> str | None:
    """The markdown table of every contrast whose two rows ran (``rows``: row name → its runs under "records")."""
    lines = []
    for a, b, question in CONTRASTS:
        if a not in rows or b not in rows:
            continue
        paired = paired_runs(rows[a]["records"], rows[b]["records"])
        if paired is None:
            continue
        f1 = {name: {r["seed"]: r["test"]["macro_f1"] for r in rows[name]["records"]} for name in (a, b)}
        per_seed = [f1[a][s] - f1[b][s] for s in paired.seeds]
        interval, test = paired.bootstrap(), paired.mcnemar()
        spread = f" ± {statistics.stdev(per_seed):.3f}" if len(per_seed) > 1 else ""
        lines.append(f"| {a} − {b} | {question} | {len(paired.seeds)} | {statistics.fmean(per_seed):+.3f}{spread} | "
                     + ", ".join(f"{d:+.3f}" for d in per_seed)
                     + f" | [{interval.low:+.3f}, {interval.high:+.3f}] | {test.p_exact:.3g} | **{judge(interval, per_seed)}** |")
    if not lines:
        return None
    head = ("Contrasts (test macro-F1, A − B on paired seeds): mean ± sd of the per-seed differences, each seed's, the 95 % "
            "paired bootstrap interval over test images, McNemar's exact p; **holds**: the interval excludes 0 and every "
            "seed agrees, **noise**: the interval includes 0, **seed-dependent**: the seeds disagree.")
    return "\n".join([head, "", "| A − B | what it isolates | seeds | Δ mean ± sd | Δ per seed | 95 % CI (images) | McNemar p | verdict |",
                      "|---|---|---:|---:|---|---|---:|---|", *lines])
