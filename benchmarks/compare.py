"""MSMAE vs MAE vs a supervised ViT at equal budget, on one GPU (or CPU), without Ray or MLflow.

Run every (method, seed) on a bundle and append one JSON line per finished run:

    python benchmarks/compare.py --bundle bundles/btmd-112.pt --preset small --img-size 112 --patch-size 8 \\
        --pretrain-epochs 10 --finetune-epochs 10 --seeds 0 1 2 --device cuda --out results/btmd.jsonl

Print the table of a results file (markdown) and, where MLflow is installed, log every run
under one experiment per dataset:

    python benchmarks/compare.py report results/btmd.jsonl --mlflow-uri sqlite:///mlflow.db

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
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ["supervised", "mae", "msmae", "msmae_ft_all", "msmae_released"]
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


def run_main(argv: list[str]) -> None:
    clock = Clock(None)  # the budget counts from here: imports, decoding and calibration included
    args = run_parser().parse_args(argv)
    clock.budget = args.time_budget
    import torch

    import msmae
    from comparison.budget import calibrate, estimate_run, fit_epochs, plan_runs
    from comparison.bundle import load_bundle
    from comparison.runner import METHODS, PretrainCache, load_device_data, run_method

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        sys.exit(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.fit_epochs and args.time_budget is None:
        sys.exit("--fit-epochs needs --time-budget")
    if args.stage == "pretrain" and (args.pretrained_dir is None or args.fit_epochs):
        sys.exit("--stage pretrain needs --pretrained-dir (where the next command finds them) and fixed epochs (no --fit-epochs)")
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
    times = None
    if args.fit_epochs or args.time_budget is not None:
        times = calibrate(recipe, data, device)
        print("step seconds (batch %d): %s" % (recipe.batch_size, {k: round(v, 5) for k, v in times.as_dict().items()}), flush=True)
    if args.fit_epochs:
        left = args.time_budget - clock.elapsed()
        recipe, total = fit_epochs(recipe, methods, args.seeds, counts, times, left, rescale=lambda e1, e2: build_recipe(args, e1, e2))
        print(f"fitted epochs to {left:.0f}s left: pretrain {recipe.pretrain_epochs}, finetune {recipe.finetune_epochs} "
              f"(supervised {recipe.supervised_epochs()}), estimated {total:.0f}s", flush=True)
    cache = PretrainCache(directory=args.pretrained_dir)
    if args.stage == "pretrain":
        pretrain_only(methods, recipe, data, args.seeds, device, cache, bundle.name, clock)
        return
    runs = plan_runs(methods, args.seeds)
    estimates = [estimate_run(m, recipe, counts, times, shared) if times else 0.0 for _, m, shared in runs]
    if times:
        print("plan (estimated seconds): " + ", ".join(f"{m.name}/s{s}{'*' if sh else ''} {e:.1f}" for (s, m, sh), e in zip(runs, estimates, strict=True))
              + f"; total {sum(estimates):.0f}s  (* reuses the seed's MSMAE pre-training)", flush=True)

    session = {"session": uuid.uuid4().hex[:12], "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "bundle": str(args.bundle), "torch": torch.__version__, "msmae": msmae.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    measured: dict[str, list[float]] = defaultdict(list)
    records, skipped = [], []
    for k, ((seed, method, shared), estimate) in enumerate(zip(runs, estimates, strict=True)):
        # what this run should take: the plan, or what the same method took already (the larger)
        expect = max([estimate] + measured[method.name + ("*" if shared else "")])
        if not clock.fits(expect):
            skipped = [(s, m.name) for s, m, _ in runs[k:]]
            print(f"time budget: {clock.elapsed():.0f}s used of {args.time_budget:.0f}s, next run needs ~{expect:.0f}s: "
                  f"stopping before {len(skipped)} runs", flush=True)
            break
        clock.run_estimate, clock.run_start = expect, time.perf_counter()
        clock.remaining_estimate = sum(estimates[k + 1:])
        tag = f"[{bundle.name} {method.name} s{seed}]"
        record = run_method(method, recipe, data, seed, device, progress=lambda row, tag=tag: _print_epoch(tag, row, clock), cache=cache)
        record.update(session, preset=args.preset, device=device_name, estimate_seconds=estimate, run_order=k)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        measured[method.name + ("*" if shared else "")].append(record["measured_seconds"])
        records.append(record)
        t = record["test"]
        print(f"{tag} done in {record['measured_seconds']:.1f}s (est. {estimate:.1f}s): selected epoch {record['selected_epoch'] + 1}, "
              f"val f1 {record['val']['macro_f1']:.3f}; test acc {t['accuracy']:.3f} bal {t['balanced_accuracy']:.3f} "
              f"f1 {t['macro_f1']:.3f}  [{clock.elapsed():.0f}s elapsed]", flush=True)
    print()
    print(markdown_tables(records))
    if skipped:
        print(f"\nnot run (time budget): {skipped}")
    print(f"\n{len(records)} runs in {clock.elapsed():.0f}s; appended to {args.out}")


def pretrain_only(methods, recipe, data, seeds: list[int], device, cache, name: str, clock: Clock) -> None:
    """Every distinct pre-training of ``methods`` × ``seeds`` into the cache's directory (found there already: skipped)."""
    from comparison.runner import pretrained_encoder

    done = set()
    for seed in seeds:
        for method in methods:
            if method.pretrain == "none" or (method.pretrain_key, seed) in done:
                continue
            done.add((method.pretrain_key, seed))
            tag = f"[{name} {method.name} s{seed} pretrain]"
            _, result, found = pretrained_encoder(method, recipe, data, seed, device,
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


def summarise(records: list[dict]) -> dict[tuple, dict[str, dict]]:
    """setting → method → {seeds, metric lists, wall seconds}, in first-seen order."""
    out: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in records:
        row = out[setting_of(r)].setdefault(r["method"], {"seeds": [], "wall": [], "selected": [], "sam": [], **{f"{s}_{m}": [] for s, m, _ in HEADLINE}})
        if r.get("sam_started_epoch") is not None:
            row["sam"].append(r["sam_started_epoch"] + 1)
        row["seeds"].append(r["seed"])
        row["wall"].append(r["wall_seconds"])
        row["selected"].append(r["selected_epoch"] + 1)
        for split, metric, _ in HEADLINE:
            row[f"{split}_{metric}"].append(r[split][metric])
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


def markdown_tables(records: list[dict]) -> str:
    """One markdown table per dataset and setting: mean ± sd over seeds (sample sd), then the verdict."""
    if not records:
        return "(no finished runs)"
    blocks = []
    for setting, methods in summarise(records).items():
        first = next(r for r in records if setting_of(r) == setting)
        rec = first["recipe"]
        blocks.append(
            f"**{first['dataset']}** — {rec['preset']} ViT, {rec['img_size']} px, patch {rec['patch_size']}, batch {rec['batch_size']}; "
            f"pre-training {rec['pretrain_epochs']} + fine-tuning {rec['finetune_epochs']} epochs "
            f"(supervised: {rec['pretrain_epochs'] + rec['finetune_epochs']}); {first['counts']} images; {first.get('device', '?')}. "
            "Mean ± sd over seeds; model selected by validation macro-F1, evaluated once on test; "
            "wall s per run (a reused MSMAE pre-training counts its measured time)."
        )
        gated = next((r["recipe"] for r in records if setting_of(r) == setting and r.get("sam_started_epoch") is not None), None)
        if gated is not None:
            blocks[-1] += (f" MSMAE pre-training: SAM from epoch {gated['sam_start'] + 1}"
                           + (f" once the CLS head's val balanced accuracy reaches {gated['sam_gate']} (epoch {gated['sam_latest'] + 1} at the latest)"
                              if gated.get("sam_gate") is not None else "")
                           + f"; fine-tuning layer decay {gated['layer_decay']} (supervised: none)"
                           + ("; class-balanced loss" if gated.get("class_balance") else "") + ".")
        head = "| method | seeds | " + " | ".join(h for _, _, h in HEADLINE) + " | selected epoch | SAM from epoch | wall s |"
        lines = [head, "|" + "---|" * 2 + "---:|" * (len(HEADLINE) + 3)]
        for method, row in methods.items():
            cells = [_mean_sd(row[f"{s}_{m}"]) for s, m, _ in HEADLINE]
            lines.append(f"| {method} | {len(row['seeds'])} | " + " | ".join(cells)
                         + f" | {_mean_sd(row['selected'], 1)} | {_mean_sd(row['sam'], 1)} | {_mean_sd(row['wall'], 1)} |")
        blocks.append("\n".join(lines))
        blocks.append(verdict(methods))
    return "\n\n".join(blocks)


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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        report_main(argv[1:])
    else:
        run_main(argv)


if __name__ == "__main__":
    main()
