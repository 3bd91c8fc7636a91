"""Does ``msmae predict`` scale? Driver memory at N = 500 vs 10,000 images, and images/s vs a plain torch loop.

    .venv/bin/python benchmarks/bench_predict.py                      # N = 500 and 10,000, the sample's 96 px JPEGs
    .venv/bin/python benchmarks/bench_predict.py --side 512           # the same images re-encoded at 512 px (decode costs more)
    .venv/bin/python benchmarks/bench_predict.py --sizes 200 1000     # a quick run

The images are synthesised from the bundled sample (data/sample/btmd, 600 JPEGs): image ``i`` is
sample ``i % 600`` flipped and/or transposed and re-encoded at a JPEG quality that depends on
``i // 600``, so no two files are byte-identical. The smaller set is hard links to the first
files of the larger one. The model is an untrained classifier (the demo's tiny ViT at 64 px)
saved as a checkpoint folder: the timing does not depend on the weights.

Each measurement runs in a fresh process, one at a time:
- ``ray``: ``predict_folder`` on a local Ray (started first; its start-up is reported apart). The
  driver's peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` (the whole process life) and its growth
  during the job is sampled from /proc/self/status every 50 ms.
- ``plain``: one process, no Ray: the same listing, ``images.load_image`` → resize → normalise →
  ``msmae.predict_probs`` in batches, torch using every core, the rows written to one Parquet file.
Both read the same files on the same cores; ratios from one run are what count.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE = REPO / "data" / "sample" / "btmd"


def synthesise(out: Path, n: int, side: int | None) -> Path:
    """``n`` distinct JPEGs from the sample (flip/transpose, re-encoded at varying quality), in class folders."""
    from PIL import Image

    sources = sorted(p for p in SAMPLE.rglob("*.jpg"))
    ops = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.TRANSPOSE]
    done = out.with_name(out.name + ".complete")  # beside the folder: every file inside is a row
    if done.is_file() and int(done.read_text()) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    for i in range(n):
        src = sources[i % len(sources)]
        rnd = i // len(sources)
        with Image.open(src) as img:
            img = img.convert("RGB")
            if side:
                img = img.resize((side, side), Image.Resampling.BICUBIC)
            if ops[rnd % 4] is not None:
                img = img.transpose(ops[rnd % 4])
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=95 - (rnd // 4) % 20)
        dest = out / src.parent.name / f"{src.stem}_{i:05d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(buf.getvalue())
    done.write_text(str(n))
    return out


def subset(full: Path, out: Path, n: int) -> Path:
    """The first ``n`` files of ``full`` (sorted), hard-linked into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    files = sorted(p for p in full.rglob("*.jpg"))[:n]
    for f in files:
        dest = out / f.relative_to(full)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, dest)
    return out


def make_checkpoint(path: Path, img_size: int) -> Path:
    """An untrained classifier of the sample's classes, written with the project's checkpoint writer."""
    import msmae
    from pipelines import checkpoint

    classes = sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())
    preset = msmae.get_preset("tiny", img_size)
    model = msmae.build_classifier(preset, len(classes), drop_path_rate=0.0)
    return checkpoint.write_checkpoint(
        path, stage="finetune", model_state=model.state_dict(), optimizer_state={}, table=msmae.AttentionTable(1, preset.grid),
        epoch=0, best=None, preset=preset, class_names=classes, metrics={}, config={},
    )


class RssSampler(threading.Thread):
    """Peak resident memory of this process, read from /proc/self/status every ``period`` seconds."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.stop = period, current_rss(), threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.peak = max(self.peak, current_rss())


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child_ray(images: Path, model: Path, out: Path, batch_size: int, actors: int | None = None) -> dict:
    import ray

    from pipelines.local_ray import ensure_ray
    from pipelines.serve.predict import PredictSettings, predict_folder

    start = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - start
    before = current_rss()
    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    summary = predict_folder(str(model), images, out, PredictSettings(batch_size=batch_size, actors=actors))
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    ray.shutdown()
    return {"seconds": seconds, "ray_start_s": ray_start, "rows": summary["images"], "ok": summary["images"] - summary["unreadable"],
            "actors": summary["pool"]["max_actors"], "shards": summary["shards"], "rss_before": before, "rss_peak_job": sampler.peak,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child_plain(images: Path, model: Path, out: Path, batch_size: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import msmae
    from pipelines import checkpoint
    from pipelines.data import images as decode
    from pipelines.serve.predict import result_table
    from pipelines.data.sources import scan_tree
    from pipelines.data.transforms import normalise, resize_whole

    torch.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    classifier, names = checkpoint.load_classifier(model)
    size = classifier.preset.img_size
    paths = [str(images / e.rel) for e in scan_tree(images)]
    tables = []
    for at in range(0, len(paths), batch_size):
        chunk = paths[at:at + batch_size]
        pixels, ok = [], np.zeros(len(chunk), dtype=bool)
        reason = np.array([None] * len(chunk), dtype=object)
        for k, p in enumerate(chunk):
            img = decode.load_image(p, "RGB")
            if isinstance(img, decode.Rejected):
                reason[k] = img.reason
                continue
            pixels.append(normalise(resize_whole(img, size)))
            ok[k] = True
        probs = np.full((len(chunk), len(names)), np.nan, dtype=np.float32)
        if pixels:
            probs[ok] = msmae.predict_probs(classifier, torch.from_numpy(np.stack(pixels))).numpy()
        tables.append(result_table(chunk, ok, reason, reason, probs, names))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.concat_tables(tables), out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": len(paths), "ok": int(sum(t.column("ok").to_numpy().sum() for t in tables)),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_child(kind: str, images: Path, model: Path, out: Path, batch_size: int, actors: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local Ray of its own
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--images", str(images), "--model", str(model), "--out", str(out),
         "--batch-size", str(batch_size), *(["--actors", str(actors)] if actors else [])],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    if proc.returncode:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 10_000])
    parser.add_argument("--side", type=int, default=None, help="re-encode the images at this side (default: the sample's 96 px)")
    parser.add_argument("--img-size", type=int, default=64, help="the model's input size (the demo's 64)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None, help="scoring actors (default: predict's, sized to the cluster)")
    parser.add_argument("--only-ray", action="store_true", help="skip the plain loop")
    parser.add_argument("--workdir", type=Path, default=None, help="keep images here between runs (default: a temporary folder)")
    parser.add_argument("--child", choices=["ray", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "ray":
            print(json.dumps(child_ray(args.images, args.model, args.out, args.batch_size, args.actors)))
        else:
            print(json.dumps(child_plain(args.images, args.model, args.out, args.batch_size)))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-predict-"))
    work.mkdir(parents=True, exist_ok=True)
    sizes = sorted(args.sizes)
    t0 = time.perf_counter()
    full = synthesise(work / f"images-{sizes[-1]}-{args.side or 'orig'}", sizes[-1], args.side)
    print(f"synthesised {sizes[-1]} images in {full} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model = make_checkpoint(work / "model", args.img_size)
    results = {}
    for n in sizes:
        images = full if n == sizes[-1] else subset(full, work / f"images-{n}", n)
        ray_result = run_child("ray", images, model, work / f"out-ray-{n}", args.batch_size, args.actors)
        if args.only_ray:
            print(f"N={n}: ray {json.dumps(ray_result)}  ({n / ray_result['seconds']:.0f} img/s)", flush=True)
            continue
        plain_result = run_child("plain", images, model, work / f"out-plain-{n}.parquet", args.batch_size)
        assert ray_result["rows"] == plain_result["rows"] == n, (ray_result, plain_result)
        results[n] = (ray_result, plain_result)
        print(f"N={n}: ray {json.dumps(ray_result)}\n       plain {json.dumps(plain_result)}", flush=True)

    if args.only_ray:
        return
    mib = 1 << 20
    print(f"\nmsmae predict vs a plain torch loop; {os.cpu_count()} cores, model tiny ViT @ {args.img_size} px, batch {args.batch_size}, "
          f"images {args.side or 'sample 96'} px JPEG, load average {os.getloadavg()[0]:.1f} at the end")
    print("| N | Ray: s (img/s) | Ray start s | actors | shards | driver peak RSS MiB | driver RSS growth in job MiB "
          "| plain loop: s (img/s) | Ray / plain img/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, (r, p) in results.items():
        print(f"| {n} | {r['seconds']:.1f} ({n / r['seconds']:.0f}) | {r['ray_start_s']:.1f} | {r['actors']} | {r['shards']} "
              f"| {r['ru_maxrss'] / mib:.0f} | {(r['rss_peak_job'] - r['rss_before']) / mib:.0f} "
              f"| {p['seconds']:.1f} ({n / p['seconds']:.0f}) | {(n / r['seconds']) / (n / p['seconds']):.2f}x |")
    small, large = results[sizes[0]][0], results[sizes[-1]][0]
    ratio = large["ru_maxrss"] / small["ru_maxrss"]
    print(f"\ndriver peak RSS, N={sizes[-1]} / N={sizes[0]}: {ratio:.3f}x (goal <= 1.3x: {'met' if ratio <= 1.3 else 'NOT met'})")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
