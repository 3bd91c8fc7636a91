"""MSMAE vs MAE vs a supervised ViT at equal budget, on one GPU (or CPU), without Ray or MLflow.

Run every (method, seed) on a bundle and append one JSON line per finished run:

    python benchmarks/compare.py --bundle bundles/btmd-112.pt --preset small --img-size 112 --patch-size 8 \\
        --pretrain-epochs 10 --finetune-epochs 10 --seeds 0 1 2 --device cuda --out results/btmd.jsonl

Print the table of a results file (markdown) and, where MLflow is installed, log every run
under one experiment per dataset:

    python benchmarks/compare.py report results/btmd.jsonl --mlflow-uri sqlite:///mlflow.db

Print the base learning rate a run with --lr-grid chose for one method (for a later run on another schedule):

    python benchmarks/compare.py chosen-lr results/dedup/btmd.jsonl msmae_ft_all

The run mode imports torch, torchvision, timm, numpy, msmae and comparison only. See docs/compare.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ["supervised", "supervised_eqflops", "resnet18", "mae", "mae_cls", "msmae", "msmae_frozen_maps", "msmae_ft_all",
                   "msmae_uniform_ft_all", "msmae_released"]
HEADLINE = [("test", "accuracy", "test acc"), ("test", "balanced_accuracy", "test bal. acc"),
            ("test", "macro_f1", "test macro-F1"), ("val", "macro_f1", "val macro-F1 (selected)")]


# --- run mode ------------------------------------------------------------------------------


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle made by benchmarks/make_bundle.py")
    p.add_argument("--out", type=Path, required=True, help="JSON-lines file; one line is appended per finished run")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help=f"default: {' '.join(DEFAULT_METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--preset", default="small", help="tiny | small | base (default small)")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--finetune-epochs", type=int, default=10, help="the supervised baseline trains pretrain + finetune epochs")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=512)
    p.add_argument("--pretrain-blr", type=float, default=1e-3, help="lr = blr * batch / 256 (default 1e-3, the paper's)")
    p.add_argument("--finetune-blr", type=float, default=1e-3)
    p.add_argument("--layer-decay", type=float, default=0.75,
                   help="fine-tuning layer-wise lr decay of pre-trained methods (default 0.75, the paper's; 1.0: none). "
                        "The supervised ViT never gets one")
    p.add_argument("--sam-start", type=int, help="pre-training epochs of random masking before SAM (default --sam-start-fraction)")
    p.add_argument("--sam-start-fraction", type=float, default=0.3,
                   help="SAM starts after this share of pre-training (default 0.3; the paper 40/300 = 0.13)")
    p.add_argument("--sam-gate", type=float,
                   help="and only once the CLS head's validation balanced accuracy reaches this (checked every epoch; "
                        "SAM starts at half of pre-training at the latest)")
    p.add_argument("--class-balance", action="store_true",
                   help="weight cross-entropy by inverse class frequency in both stages (for imbalanced data, e.g. HAM10000)")
    p.add_argument("--refresh-every", type=int, help="pre-training epochs between map refreshes (default 20 %%)")
    p.add_argument("--finetune-refresh-every", type=int, help="fine-tuning epochs between map refreshes (default 20 %%)")
    p.add_argument("--map-source", default="cls_attention",
                   help="where the attention rule's maps come from: cls_attention (the paper), rollout, grad_attention, occlusion")
    p.add_argument("--lesion-sources", nargs="*", default=[],
                   help="with a bundle made with --masks: further map sources scored against the validation lesion masks at every refresh")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--time-budget", type=float, help="seconds: start no run that would end after this (from the start of this command)")
    p.add_argument("--fit-epochs", action="store_true",
                   help="time a few steps of each kind first and scale both stages' epochs down (never up) until "
                        "every planned run fits --time-budget")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--pretrained-dir", type=Path,
                   help="save every pre-training here and reuse the ones found (a later command with the same arguments)")
    p.add_argument("--lr-grid", nargs="+", type=float, metavar="BLR",
                   help="choose each method's learning rate on validation from these base lrs (lr = blr * batch / 256): the "
                        "pre-training blr of pre-trained methods, the only stage's of supervised ones; every method at every value "
                        "on --lr-select-seed, then the other seeds at the value with the best validation macro-F1")
    p.add_argument("--lr-select-seed", type=int, help="the seed whose runs choose the learning rate (default: the first of --seeds)")
    p.add_argument("--checkpoint-every", type=int,
                   help="save each pre-training's whole state into --pretrained-dir every N epochs; a later command resumes from it")
    p.add_argument("--snapshots", nargs="+", type=int, metavar="EPOCHS",
                   help="keep the pre-trained encoder after these epochs (into --pretrained-dir) and fine-tune each pre-trained "
                        "method from every one of them (the pre-training-length curve)")
    p.add_argument("--stage", choices=["all", "pretrain"], default="all",
                   help="pretrain: only run the methods' pre-trainings into --pretrained-dir (for 10-minute command caps); "
                        "then run the same command without --stage")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_recipe(args: argparse.Namespace, pretrain_epochs: int, finetune_epochs: int):
    from comparison.runner import Recipe

    overrides = {k: v for k, v in {
        "sam_start": args.sam_start, "refresh_every": args.refresh_every, "finetune_refresh_every": args.finetune_refresh_every,
    }.items() if v is not None}
    return Recipe.for_epochs(
        pretrain_epochs, finetune_epochs, sam_start_fraction=args.sam_start_fraction, preset=args.preset, img_size=args.img_size,
        patch_size=args.patch_size, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size, pretrain_blr=args.pretrain_blr,
        finetune_blr=args.finetune_blr, layer_decay=args.layer_decay, sam_gate=args.sam_gate, class_balance=args.class_balance,
        map_source=args.map_source, lesion_sources=tuple(args.lesion_sources), **overrides,
    )


class Clock:
    """The command's time budget and the ETA shown with every epoch."""

    def __init__(self, budget: float | None) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.remaining_estimate = 0.0  # estimated seconds of runs not yet started
        self.run_estimate = 0.0
        self.run_start = self.start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, estimate: float) -> bool:
        return self.budget is None or self.elapsed() + estimate <= self.budget

    def eta(self) -> float:
        in_run = max(self.run_estimate - (time.perf_counter() - self.run_start), 0.0)
        return in_run + self.remaining_estimate


class Job(NamedTuple):
    """One planned run: a method and seed, the grid's learning rate (None: the recipe's;
    CHOSEN: the one the selection seed chose) and the pre-training snapshot to fine-tune from."""

    seed: int
    method: object  # comparison.runner.Method
    blr: float | str | None = None
    snapshot: int | None = None


CHOSEN = "chosen"


def run_identity(dataset: str, counts: dict, method: str, seed: int, recipe: dict, snapshot: int | None) -> str:
    """What makes a run the same run: finished ones found in --out are not run again."""
    return json.dumps([dataset, counts, method, seed, recipe, snapshot], sort_keys=True)


def record_identity(record: dict) -> str:
    return run_identity(record["dataset"], record["counts"], record["method"], record["seed"], record["recipe"],
                        record.get("pretrain_checkpoint_epoch"))


def job_identity(job: Job, recipe, data) -> str:
    from comparison.runner import effective_recipe

    blr = None if job.blr is None else float(job.blr)
    planned = json.loads(json.dumps(asdict(effective_recipe(job.method, recipe, blr))))
    return run_identity(data.name, data.counts(), job.method.name, job.seed, planned, job.snapshot)


def plan_jobs(methods: list, seeds: list[int], grid: list[float] | None, select_seed: int, snapshots: list[int] | None) -> list[Job]:
    """Seed-major jobs. With a grid: every method at every grid value on the selection seed
    first, then the other seeds at the value chosen (resolved when they start)."""
    def expand(seed: int, method, blr) -> list[Job]:
        if snapshots and method.pretrain != "none":
            return [Job(seed, method, blr, e) for e in snapshots]
        return [Job(seed, method, blr)]

    jobs: list[Job] = []
    if grid:
        jobs += [j for m in methods for lr in grid for j in expand(select_seed, m, lr)]
    for seed in seeds:
        if grid and seed == select_seed:
            continue
        jobs += [j for m in methods for j in expand(seed, m, CHOSEN if grid else None)]
    return jobs


def choose_lr(method, recipe, data, grid: list[float], select_seed: int, done: dict[str, dict]) -> float | None:
    """The grid value whose selection-seed run has the best validation macro-F1 (None: not all have run)."""
    scores = []
    for lr in grid:
        record = done.get(job_identity(Job(select_seed, method, lr), recipe, data))
        if record is None:
            return None
        scores.append((record["val"]["macro_f1"], -grid.index(lr), lr))  # ties: the first in the grid
    return max(scores)[2]


def run_main(argv: list[str]) -> None:
    clock = Clock(None)  # the budget counts from here: imports, decoding and calibration included
    args = run_parser().parse_args(argv)
    clock.budget = args.time_budget
    import torch

    import msmae
    from comparison.budget import calibrate, estimate_run, fit_epochs
    from comparison.bundle import load_bundle
    from comparison.pretrain_store import PretrainCache
    from comparison.runner import METHODS, effective_recipe, finetune_epochs, load_device_data, run_method, step_flops

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.fit_epochs and args.time_budget is None:
        sys.exit("--fit-epochs needs --time-budget")
    if args.stage == "pretrain" and (args.pretrained_dir is None or args.fit_epochs or args.lr_grid):
        sys.exit("--stage pretrain needs --pretrained-dir (where the next command finds them), fixed epochs (no --fit-epochs) "
                 "and a fixed learning rate (no --lr-grid)")
    if (args.checkpoint_every or args.snapshots) and args.pretrained_dir is None:
        sys.exit("--checkpoint-every and --snapshots save into --pretrained-dir: give it")
    if args.snapshots and args.lr_grid:
        sys.exit("--snapshots with --lr-grid: choose the learning rate on the short schedule, then pass it (--pretrain-blr)")
    if args.snapshots and max(args.snapshots) > args.pretrain_epochs:
        sys.exit(f"--snapshots {args.snapshots}: beyond --pretrain-epochs {args.pretrain_epochs}")
    select_seed = args.lr_select_seed if args.lr_select_seed is not None else args.seeds[0]
    if args.lr_grid and select_seed not in args.seeds:
        sys.exit(f"--lr-select-seed {select_seed} is not one of --seeds {args.seeds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [METHODS[m] for m in args.methods]
    bundle = load_bundle(args.bundle)
    data = load_device_data(bundle, args.img_size, device)
    counts = data.counts()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{bundle.name}: {counts} images, {data.num_classes} classes, decoded in {data.decode_seconds:.1f}s on {device_name}", flush=True)

    recipe = build_recipe(args, args.pretrain_epochs, args.finetune_epochs)
    jobs = plan_jobs(methods, args.seeds, args.lr_grid, select_seed, args.snapshots)
    times = None
    if args.fit_epochs or args.time_budget is not None:
        times = calibrate(recipe, data, device)
        print("step seconds (batch %d): %s" % (recipe.batch_size, {k: round(v, 5) for k, v in times.as_dict().items()}), flush=True)
    if args.fit_epochs:
        left = args.time_budget - clock.elapsed()
        recipe, total = fit_epochs(recipe, methods, args.seeds, counts, times, left, rescale=lambda e1, e2: build_recipe(args, e1, e2),
                                   runs_per_method=len(jobs) / max(len(methods) * len(args.seeds), 1))
        print(f"fitted epochs to {left:.0f}s left: pretrain {recipe.pretrain_epochs}, finetune {recipe.finetune_epochs} "
              f"(supervised {recipe.supervised_epochs()}), estimated {total:.0f}s", flush=True)
    cache = PretrainCache(directory=args.pretrained_dir, checkpoint_every=args.checkpoint_every, snapshots=tuple(args.snapshots or ()))
    if args.stage == "pretrain":
        pretrain_only(methods, recipe, data, args.seeds, device, cache, bundle.name, clock)
        return
    done = {record_identity(r): r for r in read_records([args.out])} if args.out.is_file() else {}

    def estimate(job: Job, shared: bool) -> float:
        if times is None:
            return 0.0
        eff = effective_recipe(job.method, recipe)
        epochs, _ = finetune_epochs(job.method, eff, step_flops(eff, data.num_classes) if job.method.equal_flops else None)
        return estimate_run(job.method, eff, counts, times, shared, finetune_epochs=epochs)

    seen: set[tuple] = set()
    estimates = []
    for job in jobs:
        key = (job.method.pretrain_key, job.seed, job.blr)
        estimates.append(estimate(job, job.method.pretrain != "none" and key in seen))
        seen.add(key)
    if times:
        print(f"plan: {len(jobs)} runs, estimated {sum(estimates):.0f}s in all", flush=True)

    session = {"session": uuid.uuid4().hex[:12], "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "bundle": str(args.bundle), "torch": torch.__version__, "msmae": msmae.__version__,
               "threads": torch.get_num_threads()}  # wall times are only comparable at the same thread count
    if args.lr_grid:
        session["lr_selection"] = {"grid": list(args.lr_grid), "seed": select_seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    measured: dict[str, list[float]] = defaultdict(list)
    records, skipped, waiting, found = [], [], [], 0
    for k, (job, est) in enumerate(zip(jobs, estimates, strict=True)):
        method, seed = job.method, job.seed
        blr = job.blr
        if blr == CHOSEN:
            blr = choose_lr(method, recipe, data, args.lr_grid, select_seed, done)
            if blr is None:
                waiting.append((seed, method.name))
                print(f"[{bundle.name} {method.name} s{seed}] skipped: the learning-rate grid has not finished on seed {select_seed}",
                      flush=True)
                continue
        job = job._replace(blr=blr)
        identity = job_identity(job, recipe, data)
        if identity in done:
            found += 1
            records.append(done[identity])
            continue
        expect = max([est] + measured[method.name])
        if not clock.fits(expect):
            skipped += [(j.seed, j.method.name) for j in jobs[k:]]
            print(f"time budget: {clock.elapsed():.0f}s used of {args.time_budget:.0f}s, next run needs ~{expect:.0f}s: "
                  f"stopping before {len(jobs) - k} runs", flush=True)
            break
        clock.run_estimate, clock.run_start = expect, time.perf_counter()
        clock.remaining_estimate = sum(estimates[k + 1:])
        tag = f"[{bundle.name} {method.name} s{seed}" + (f" blr {blr:g}" if args.lr_grid else "") \
            + (f" from e{job.snapshot}" if job.snapshot is not None else "") + "]"
        record = run_method(method, recipe, data, seed, device, progress=lambda row, tag=tag: _print_epoch(tag, row, clock), cache=cache,
                            blr=blr if args.lr_grid else None, from_snapshot=job.snapshot)
        record.update(session, preset=args.preset, device=device_name, estimate_seconds=est, run_order=k)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done[identity] = record
        measured[method.name].append(record["measured_seconds"])
        records.append(record)
        t = record["test"]
        print(f"{tag} done in {record['measured_seconds']:.1f}s (est. {est:.1f}s): selected epoch {record['selected_epoch'] + 1}, "
              f"val f1 {record['val']['macro_f1']:.3f}; test acc {t['accuracy']:.3f} bal {t['balanced_accuracy']:.3f} "
              f"f1 {t['macro_f1']:.3f}  [{clock.elapsed():.0f}s elapsed]", flush=True)
    print()
    print(markdown_tables(records))
    if found:
        print(f"\n{found} runs were already in {args.out} and were not run again")
    if skipped:
        print(f"\nnot run (time budget): {skipped}")
    if waiting:
        print(f"\nnot run (their learning rate is not chosen yet: run the command again): {waiting}")
    print(f"\n{len(records) - found} runs in {clock.elapsed():.0f}s; appended to {args.out}")


def pretrain_only(methods, recipe, data, seeds: list[int], device, cache, name: str, clock: Clock) -> None:
    """Every distinct pre-training of ``methods`` × ``seeds`` into the cache's directory (found there already: skipped)."""
    from comparison.runner import effective_recipe, pretrained_encoder

    done = set()
    for seed in seeds:
        for method in methods:
            if method.pretrain == "none" or (method.pretrain_key, seed) in done:
                continue
            done.add((method.pretrain_key, seed))
            tag = f"[{name} {method.name} s{seed} pretrain]"
            _, result, found = pretrained_encoder(method, effective_recipe(method, recipe), data, seed, device,
                                                  lambda row, tag=tag: _print_epoch(tag, row, clock), cache)
            print(f"{tag} {'found' if found else 'saved'} in {cache.directory} ({result.seconds:.0f}s of pre-training)", flush=True)
    print(f"{len(done)} pre-trainings in {cache.directory}; {clock.elapsed():.0f}s", flush=True)


def _print_epoch(tag: str, row: dict, clock: Clock) -> None:
    val = f"  val acc {row['val_accuracy']:.3f} f1 {row['val_macro_f1']:.3f}" if "val_macro_f1" in row else ""
    if "val_cls_balanced_accuracy" in row:  # MSMAE pre-training: the CLS head whose maps SAM follows
        val = f"  CLS head val bal. acc {row['val_cls_balanced_accuracy']:.3f}"
    stage_eta = row["seconds"] * (row["epochs"] - row["epoch"] - 1)
    total = f", all runs ~{max(clock.eta(), stage_eta):.0f}s" if clock.run_estimate else ""
    print(f"{tag} {row['stage']} {row['epoch'] + 1}/{row['epochs']} {row['phase']}  loss {row['train_loss']:.4f}{val}  "
          f"{row['images'] / max(row.get('train_seconds', row['seconds']), 1e-9):.0f} img/s  ETA stage {stage_eta:.0f}s{total}", flush=True)


# --- tables --------------------------------------------------------------------------------


def _mean_sd(values: list[float], digits: int = 3) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


_SETTING = ("preset", "img_size", "patch_size", "batch_size", "pretrain_epochs", "finetune_epochs")


def setting_of(record: dict) -> tuple:
    """What must match for runs to share a table row: dataset, recipe size and epochs, device."""
    rec = record["recipe"]
    return (record["dataset"], *(rec[k] for k in _SETTING), record.get("device", "?"))


def row_label(record: dict) -> str:
    """A table row's name: the method, and the map source where it is not the paper's (``--map-source``), so runs of
    one method with different sources are rows of their own, compared like methods."""
    source = record["recipe"].get("map_source", "cls_attention")
    return record["method"] if source == "cls_attention" else f"{record['method']} [{source}]"


def summarise(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """setting → row (``row_label``) → {seeds, metric lists, wall seconds, compute}, in first-seen order."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        row = out[setting_of(r)].setdefault(row_label(r), {"seeds": [], "wall": [], "selected": [], "sam": [], "flops": [], "epochs": [],
                                                          "blr": [], "records": [], **{f"{s}_{m}": [] for s, m, _ in HEADLINE}})
        if r.get("sam_started_epoch") is not None:
            row["sam"].append(r["sam_started_epoch"] + 1)
        row["seeds"].append(r["seed"])
        row["wall"].append(r["wall_seconds"])
        row["selected"].append(r["selected_epoch"] + 1)
        row["records"].append(r)
        if r.get("train_flops") is not None:
            row["flops"].append(r["train_flops"])
        row["epochs"].append((r.get("pretrain_epochs", 0), r.get("finetune_epochs", 0)))
        if r.get("tuned_lr"):
            row["blr"].append(r["tuned_lr"]["blr"])
        for split, metric, _ in HEADLINE:
            row[f"{split}_{metric}"].append(r[split][metric])
    return out


def grid_choices(records: list[dict]) -> dict[tuple, dict]:
    """(setting, method) → {"seed", "grid": {blr: val macro-F1}, "chosen": blr} for runs made with --lr-grid."""
    out: dict[tuple, dict] = {}
    for r in records:
        selection, tuned = r.get("lr_selection"), r.get("tuned_lr") or {}
        if not selection or not tuned.get("from_grid") or r["seed"] != selection["seed"] or r.get("pretrain_checkpoint_epoch") is not None:
            continue
        entry = out.setdefault((setting_of(r), row_label(r)), {"seed": selection["seed"], "order": list(selection["grid"]), "grid": {}})
        entry["grid"][tuned["blr"]] = r["val"]["macro_f1"]
    for entry in out.values():
        order = {lr: i for i, lr in enumerate(entry["order"])}
        entry["chosen"] = max(entry["grid"], key=lambda lr: (entry["grid"][lr], -order.get(lr, 0)))
    return out


def selected_records(records: list[dict]) -> list[dict]:
    """The records a table reports: grid runs only at each method's chosen learning rate."""
    choices = grid_choices(records)
    kept = []
    for r in records:
        choice = choices.get((setting_of(r), row_label(r))) if (r.get("tuned_lr") or {}).get("from_grid") else None
        if choice is None or r["tuned_lr"]["blr"] == choice["chosen"]:
            kept.append(r)
    return kept


def paired_against_best(methods: dict[str, dict], key: str = "test_macro_f1") -> dict[str, str]:
    """method → "Δ [95 % CI] | McNemar p exact / mid" against the best mean (``comparison.stats``),
    pairing each seed's per-image test predictions; "—" where predictions are missing."""
    from comparison.contrasts import paired_runs

    best = max(methods, key=lambda m: statistics.fmean(methods[m][key]))
    out = {best: "best | —"}
    for method in methods:
        if method == best:
            continue
        paired = paired_runs(methods[method]["records"], methods[best]["records"])
        if paired is None:
            out[method] = "— | —"
            continue
        test = paired.mcnemar()
        out[method] = f"{paired.bootstrap()} | {test.p_exact:.3g} / {test.p_mid:.3g}"
    return out


def _gap(a: list[float], b: list[float]) -> str:
    """Difference of means, in units of the larger seed sd: the scale a reader can judge at a glance."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    spread = max((statistics.stdev(v) for v in (a, b) if len(v) > 1), default=0.0)
    scale = f"{abs(diff) / spread:.1f} × the larger seed sd" if spread > 0 else "no seed spread to judge it by"
    return f"{diff:+.3f} ({scale})"


def verdict(methods: dict[str, dict], key: str = "test_macro_f1") -> str:
    """Who won on test macro-F1, by how much over the runner-up, and MSMAE against MAE (the paper's claim)."""
    ranked = sorted(methods, key=lambda m: statistics.fmean(methods[m][key]), reverse=True)
    parts = [f"Best test macro-F1: {ranked[0]}"]
    if len(ranked) > 1:
        parts.append(f"ahead of {ranked[1]} by {_gap(methods[ranked[0]][key], methods[ranked[1]][key])}")
    if "msmae" in methods and "mae" in methods:
        parts.append(f"msmae − mae: {_gap(methods['msmae'][key], methods['mae'][key])}")
    return "; ".join(parts) + "."


def _compute(row: dict) -> str:
    """Training compute of a row: PFLOPs (mean over seeds) and the epochs behind them."""
    flops = f"{statistics.fmean(row['flops']) / 1e15:.3g}" if row["flops"] else "—"
    pre, ft = row["epochs"][0]
    return f"{flops} | {pre} + {ft}"


def markdown_tables(records: list[dict]) -> str:
    """Per dataset and setting: the table (mean ± sd over seeds, each method against the best
    with a paired 95 % CI of the macro-F1 difference and McNemar's p, compute per row), the
    verdict, the learning-rate grid where one chose the rates, and the pre-training-length
    curve where runs were fine-tuned from snapshots."""
    from comparison.contrasts import contrast_table, curve_contrast_table

    if not records:
        return "(no finished runs)"
    chosen = selected_records(records)
    main = [r for r in chosen if r.get("pretrain_checkpoint_epoch") is None]
    blocks = []
    first_run = {label: i for i, label in enumerate(dict.fromkeys(row_label(r) for r in records))}
    for setting, methods in summarise(main).items():
        methods = dict(sorted(methods.items(), key=lambda item: first_run[item[0]]))  # run order, not the chosen runs' order
        first = next(r for r in main if setting_of(r) == setting)
        rec = first["recipe"]
        blocks.append(
            f"**{first['dataset']}** — {rec['preset']} ViT, {rec['img_size']} px, patch {rec['patch_size']}, batch {rec['batch_size']}; "
            f"pre-training {rec['pretrain_epochs']} + fine-tuning {rec['finetune_epochs']} epochs "
            f"(supervised: {rec['pretrain_epochs'] + rec['finetune_epochs']}); {first['counts']} images; {first.get('device', '?')}. "
            "Mean ± sd over seeds; model selected by validation macro-F1, evaluated once on test; "
            "Δ: macro-F1 minus the best row's, mean over paired seeds, with a 95 % paired bootstrap interval over test images; "
            "McNemar: exact / mid-p on the discordant test images of all seeds; train PFLOPs: training steps' FLOPs "
            "(comparison/flops.py); epochs: pre-training + fine-tuning; "
            "wall s per run (a reused MSMAE pre-training counts its measured time)."
        )
        gated = next((r["recipe"] for r in main if setting_of(r) == setting and r.get("sam_started_epoch") is not None), None)
        if gated is not None:
            blocks[-1] += (f" MSMAE pre-training: SAM from epoch {gated['sam_start'] + 1}"
                           + (f" once the CLS head's val balanced accuracy reaches {gated['sam_gate']} (epoch {gated['sam_latest'] + 1} at the latest)"
                              if gated.get("sam_gate") is not None else "")
                           + f"; fine-tuning layer decay {gated['layer_decay']} (supervised: none)"
                           + ("; class-balanced loss" if gated.get("class_balance") else "") + ".")
        paired = paired_against_best(methods)
        head = ("| method | seeds | " + " | ".join(h for _, _, h in HEADLINE)
                + " | Δ macro-F1 vs best [95 % CI] | McNemar p | blr | train PFLOPs | epochs | selected epoch | SAM from epoch | wall s |")
        lines = [head, "|" + "---|" * 2 + "---:|" * (len(HEADLINE) + 8)]
        for method, row in methods.items():
            cells = [_mean_sd(row[f"{s}_{m}"]) for s, m, _ in HEADLINE]
            blr = f"{row['blr'][0]:g}" if row["blr"] and len(set(row["blr"])) == 1 else ("mixed" if row["blr"] else "—")
            lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells) + f" | {paired[method]} | {blr} | {_compute(row)}"
                         + f" | {_mean_sd(row['selected'], 1)} | {_mean_sd(row['sam'], 1)} | {_mean_sd(row['wall'], 1)} |")
        blocks.append("\n".join(lines))
        blocks.append(verdict(methods))
        contrasts = contrast_table(methods)
        if contrasts:
            blocks.append(contrasts)
        lesion = lesion_table([r for r in main if setting_of(r) == setting])
        if lesion:
            blocks.append(lesion)
        grid = {m: c for (st, m), c in grid_choices(records).items() if st == setting}
        if grid:
            lrs = sorted({lr for c in grid.values() for lr in c["grid"]})
            seed = next(iter(grid.values()))["seed"]
            lines = [f"Learning-rate grid (validation macro-F1 on seed {seed}; the chosen blr in bold):",
                     "", "| method | " + " | ".join(f"blr {lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
            for m, c in grid.items():
                cells = [("—" if lr not in c["grid"] else (f"**{c['grid'][lr]:.3f}**" if lr == c["chosen"] else f"{c['grid'][lr]:.3f}"))
                         for lr in lrs]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            blocks.append("\n".join(lines))
    curve = [r for r in chosen if r.get("pretrain_checkpoint_epoch") is not None]
    equal = [r for r in chosen if r["method"] == "supervised_eqflops" and r.get("pretrain_checkpoint_epoch") is None]
    for setting, rows in _curve_groups(curve, equal).items():
        epochs = sorted({e for per in rows.values() for e in per})
        first = next(r for r in curve if curve_setting(r) == setting)
        lines = [f"**{first['dataset']}** — test macro-F1 (mean ± sd over seeds) after fine-tuning "
                 f"{first['recipe']['finetune_epochs']} epochs from the encoder saved after E of {first['recipe']['pretrain_epochs']} "
                 "pre-training epochs (one pre-training run per rule and seed, snapshots along its schedule):",
                 "", "| method | " + " | ".join(f"E = {e}" for e in epochs) + " |", "|---|" + "---:|" * len(epochs)]
        for method, per in rows.items():
            label = f"{method} (FLOPs of E + fine-tuning)" if method == "supervised_eqflops" else method
            lines.append(f"| {label} | " + " | ".join(_mean_sd([r["test"]["macro_f1"] for r in per.get(e, [])]) for e in epochs) + " |")
        blocks.append("\n".join(lines))
        contrasts = curve_contrast_table({e: {m: {"records": per[e]} for m, per in rows.items() if e in per} for e in epochs})
        if contrasts:
            blocks.append(contrasts)
    return "\n\n".join(blocks)


_LESION = (("lesion_mass", "mass"), ("lesion_lift", "lift"), ("lesion_pointing", "pointing"), ("lesion_auroc", "AUROC"))


def lesion_table(records: list[dict]) -> str | None:
    """Do the pre-trained encoders' maps find the lesion, and does the CLS head survive pre-training? Per row and map
    source: the final encoder's lesion mass, lift, pointing game and patch AUROC on the validation masks (mean ± sd
    over seeds; runs made with --lesion-sources on a bundle with masks), and the CLS head's validation balanced
    accuracy at its best pre-training epoch and at the last (a collapse shows as last far below best)."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if r.get("pretrain_lesion"):
            rows[row_label(r)].append(r)
    if not rows:
        return None
    sources = list(dict.fromkeys(k.split("/")[0] for rs in rows.values() for r in rs for k in r["pretrain_lesion"]))
    lines = ["Lesion masks (validation): the final pre-trained encoder's maps per source — lesion mass / lift / pointing / "
             "AUROC, mean ± sd over seeds — and the CLS head's validation balanced accuracy, best and last pre-training epoch:",
             "", "| row | seeds | source | lesion mass | lift | pointing | AUROC | CLS bal. acc best | CLS bal. acc last |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for label, rs in rows.items():
        accs = [[c["val_cls_balanced_accuracy"] for c in r["pretrain_curve"] if c.get("val_cls_balanced_accuracy") is not None] for r in rs]
        best = _mean_sd([max(a) for a in accs if a]) if all(accs) else "—"
        last = _mean_sd([a[-1] for a in accs if a]) if all(accs) else "—"
        for source in sources:
            if not all(f"{source}/lesion_mass" in r["pretrain_lesion"] for r in rs):
                continue
            cells = [_mean_sd([r["pretrain_lesion"][f"{source}/{k}"] for r in rs], 2 if k == "lesion_lift" else 3) for k, _ in _LESION]
            lines.append(f"| {label} | {len(rs)} | {source} | " + " | ".join(cells) + f" | {best} | {last} |")
    return "\n".join(lines) + "\n\n" + lesion_curve_table(rows, sources)


def lesion_curve_table(rows: dict[str, list[dict]], sources: list[str]) -> str:
    """Patch AUROC of each source's maps against the lesion masks along pre-training (mean over seeds): at every
    refresh of the attention rule, and on the same schedule for rules that never refresh (scored, not used)."""
    def points(r: dict, source: str) -> dict[int, float]:
        """Epochs done → AUROC: a refresh precedes its epoch's training, the other rules are scored after it, and the
        final encoder (``pretrain_lesion``) closes every curve."""
        key = f"{source}/lesion_auroc"
        out = {(c["epoch"] if c.get("maps_refreshed") else c["epoch"] + 1): c[key] for c in r["pretrain_curve"] if key in c}
        if key in r["pretrain_lesion"]:
            out.setdefault(len(r["pretrain_curve"]), r["pretrain_lesion"][key])
        return out

    epochs = sorted({e for rs in rows.values() for r in rs for source in sources for e in points(r, source)})
    lines = ["Lesion patch AUROC along pre-training (mean over seeds; E = pre-training epochs done when the maps were made):", "",
             "| row | source | " + " | ".join(f"E = {e}" for e in epochs) + " |", "|---|---|" + "---:|" * len(epochs)]
    for label, rs in rows.items():
        for source in sources:
            cells = []
            for e in epochs:
                values = [v for r in rs for done, v in points(r, source).items() if done == e]
                cells.append(f"{statistics.fmean(values):.3f}" if values else "—")
            lines.append(f"| {label} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_setting(record: dict) -> tuple:
    """A setting without its pre-training length: the points of one pre-training-length curve."""
    rec = record["recipe"]
    return (record["dataset"], rec["preset"], rec["img_size"], rec["patch_size"], rec["batch_size"], rec["finetune_epochs"],
            record.get("device", "?"))


def _curve_groups(records: list[dict], equal_flops: list[dict]) -> dict[tuple, dict[str, dict[int, list[dict]]]]:
    """curve setting → method → snapshot epoch E → its runs (one per seed); supervised_eqflops
    runs made with --pretrain-epochs E join the curve they match at E (the same FLOPs)."""
    out: dict[tuple, dict[str, dict[int, list[dict]]]] = defaultdict(dict)
    for r in records:
        out[curve_setting(r)].setdefault(row_label(r), defaultdict(list))[r["pretrain_checkpoint_epoch"]].append(r)
    for r in equal_flops:
        if curve_setting(r) in out:
            out[curve_setting(r)].setdefault("supervised_eqflops", defaultdict(list))[r["recipe"]["pretrain_epochs"]].append(r)
    return out


def read_records(paths: list[Path]) -> list[dict]:
    records = []
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such results file (did that comparison start?)", file=sys.stderr)
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:  # a line cut off by a killed run: say so, keep the rest
                    print(f"{path}:{n}: skipped an unreadable line ({e})", file=sys.stderr)
    return records


# --- report mode ---------------------------------------------------------------------------


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare.py report", description="Print the comparison table; log runs to MLflow.")
    p.add_argument("results", nargs="+", type=Path, help="JSON-lines files written by the run mode")
    p.add_argument("--mlflow-uri", help="log every run to this MLflow tracking URI (needs mlflow)")
    p.add_argument("--experiment", default="compare-{dataset}", help="experiment name; {dataset} is filled in (default compare-{dataset})")
    p.add_argument("--out", type=Path, help="also write the markdown tables here")
    return p


def report_main(argv: list[str]) -> None:
    args = report_parser().parse_args(argv)
    records = read_records(args.results)
    tables = markdown_tables(records)
    print(tables)
    if args.out:
        args.out.write_text(tables + "\n")
    if args.mlflow_uri:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from compare_mlflow import log_records  # lazily: the run mode never needs MLflow

        for line in log_records(records, args.mlflow_uri, args.experiment, markdown_tables):
            print(line)


def chosen_lr(records: list[dict], method: str) -> float:
    """The base lr the learning-rate grid chose for ``method`` (``grid_choices``): what a later run of the same
    method on another schedule (the pre-training-length curve) should train at. Refused, with the reason, when the
    records hold no finished grid for it or grids of several settings."""
    grids = [c for (_, label), c in grid_choices(records).items() if label == method]
    if not grids:
        raise ValueError(f"no learning-rate grid run of {method} in these records (run the comparison with --lr-grid first)")
    if len(grids) > 1:
        raise ValueError(f"{method} has grids of {len(grids)} settings in these records; pass the file of one comparison")
    grid = grids[0]
    missing = [lr for lr in grid["order"] if lr not in grid["grid"]]
    if missing:
        raise ValueError(f"the grid of {method} has not finished on seed {grid['seed']}: blr {missing} not run yet")
    return float(grid["chosen"])


def chosen_lr_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="compare.py chosen-lr", description="Print the base lr the grid chose for a method.")
    p.add_argument("results", type=Path, help="JSON-lines file of a comparison run with --lr-grid")
    p.add_argument("method")
    args = p.parse_args(argv)
    try:
        print(f"{chosen_lr(read_records([args.results]), args.method):g}")
    except ValueError as e:
        sys.exit(f"{args.results}: {e}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        report_main(argv[1:])
    elif argv[:1] == ["chosen-lr"]:
        chosen_lr_main(argv[1:])
    else:
        run_main(argv)


if __name__ == "__main__":
    main()
