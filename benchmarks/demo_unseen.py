"""The demo's model as a user would judge it: on BTMD images it never saw.

    .venv/bin/python benchmarks/demo_unseen.py                      # after ./scripts/demo.sh

Lists BTMD's training part (``../shared/datasets/btmd/Training``), leaves out every file
whose name is in the bundled sample the demo trained on, links the rest into a temporary
ImageFolder and runs ``msmae evaluate`` on it with the registered champion (whole images,
at the model's own size). Prints accuracy and balanced accuracy and writes the full report.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def unseen_folder(source: Path, sample: Path, out: Path) -> dict[str, int]:
    """Symlink every ``source/<class>/<file>`` whose name is not in ``sample`` into ``out``; counts per class."""
    seen = {p.name for p in sample.rglob("*") if p.is_file()}
    counts = {}
    for class_dir in sorted(d for d in source.iterdir() if d.is_dir()):
        (out / class_dir.name).mkdir(parents=True)
        files = [f for f in sorted(class_dir.iterdir()) if f.is_file() and f.name not in seen]
        for f in files:
            (out / class_dir.name / f.name).symlink_to(f.resolve())
        counts[class_dir.name] = len(files)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared/datasets/btmd/Training")
    parser.add_argument("--sample", type=Path, default=ROOT / "data/sample/btmd", help="what the demo trained on")
    parser.add_argument("--model", default="models:/msmae-btmd@champion")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'msmae-work/mlflow.db'}")
    parser.add_argument("--out", type=Path, default=ROOT / "msmae-work/unseen.json")
    args = parser.parse_args()
    if not args.source.is_dir():
        sys.exit(f"error: {args.source} not found; pass --source <BTMD Training folder>")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="msmae-unseen-") as tmp:
        counts = unseen_folder(args.source, args.sample, Path(tmp) / "images")
        print(f"unseen images: {sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in counts.items())})", flush=True)
        cmd = [str(Path(sys.executable).with_name("msmae")), "evaluate", "--model", args.model, "--data", str(Path(tmp) / "images"),
               "--tracking-uri", args.tracking_uri, "--out", str(args.out)]
        subprocess.run(cmd, check=True)
    report = json.loads(args.out.read_text())["train"]  # a raw folder is evaluated whole, as one split
    print(json.dumps({"images": report["num_samples"], "accuracy": round(report["accuracy"], 4),
                      "balanced_accuracy": round(report["balanced_accuracy"], 4), "macro_f1": round(report["macro_f1"], 4),
                      "seconds": round(time.time() - start)}))


if __name__ == "__main__":
    main()
