"""Start-up cost of a Ray Data worker process: what it imports to run the training stream's maps.

Every read/map task worker and every split coordinator of a Train stage imports the module
that holds the per-batch functions, so this cost is paid a dozen times per stage. Baseline:
the imports the data path needed while it used torchvision and timm (torch, torchvision's
transforms, timm's constants); now: ``pipelines.data.streams`` and ``pipelines.data.transforms`` as they
are. Each is imported in a fresh interpreter ``--repeats`` times, alternating; median wall
time, CPU time (user + system) and peak resident memory of the process.

    .venv/bin/python benchmarks/bench_startup.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "torch + torchvision + timm (baseline)": "import torch, torchvision.transforms, timm.data.constants",
    "pipelines.data.streams (now)": "import pipelines.data.streams, pipelines.data.transforms",
}


def measure(code: str) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one fresh interpreter running ``code``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"`python -c {code!r}` failed")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # Linux: ru_maxrss in KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in CASES}
    for _ in range(args.repeats):  # alternating, so both see the same background load
        for name, code in CASES.items():
            samples[name].append(measure(code))
    medians = {name: [statistics.median(column) for column in zip(*rows, strict=True)] for name, rows in samples.items()}
    print(f"median of {args.repeats} fresh interpreters each, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n")
    print("| imports | wall s | CPU s | peak RSS MiB |")
    print("|---|---:|---:|---:|")
    for name, (wall, cpu, rss) in medians.items():
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {rss:.0f} |")
    (b_wall, b_cpu, b_rss), (n_wall, n_cpu, n_rss) = medians.values()
    print(f"| ratio now / baseline | {n_wall / b_wall:.2f} | {n_cpu / b_cpu:.2f} | {n_rss / b_rss:.2f} |")


if __name__ == "__main__":
    main()
