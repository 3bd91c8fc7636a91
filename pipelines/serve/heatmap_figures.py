"""``msmae predict --heatmaps``: each image's occlusion map drawn over the image as the user gave it, readable.

What a reader needs from the figure, and how it is met:
- the image they know: the original file (decoded as ingest decodes it, at its own size, shrunk
  only above ``MAX_SIDE`` pixels), not the 64 px network input. The network saw the whole image
  resized to a square, so the patch grid spans the whole original; each patch is drawn as the
  block of the original it came from (nearest, no smoothing that would invent detail).
- maps that compare: one colour scale for every map of the job (±``limit``, ``shared_limit``: the
  95th percentile of the maps' largest changes; stronger patches saturate), so a red here and a
  red there mean the same probability. Colour strength follows the value: a patch that changes
  nothing leaves the image untouched.
- what the colours mean, written on it: a band under the image with the predicted class and
  its probability, the colour bar with its numbers, and what the numbers are.

Drawn with PIL and a matplotlib colour map (no matplotlib figure): 7 ms an image instead of the 0.13 s
of a matplotlib figure, a quarter of the time per image before (``benchmarks/bench_heatmaps.py``, docs/model.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 1024  # a larger original is shown shrunk to this (aspect kept)
MIN_WIDTH = 360  # the band under the image is at least this wide, so its words fit beside a small image
CMAP = "bwr"  # red: evidence for the predicted class; blue: against; white: no effect (pure hues: visible on dark scans)
MAX_ALPHA = 0.65  # the colour of a patch at ±limit covers the image this much


def heatmap_path(maps_root: Path, input_root: Path, image_path: str) -> Path:
    """``maps_root/<path under input_root>`` (without suffix): where an image's ``.npy`` and ``.png`` go."""
    path = Path(os.path.abspath(image_path))
    return maps_root / (path.relative_to(input_root) if path.is_relative_to(input_root) else path.name)


SCALE_QUANTILE = 0.95  # the shared scale ends at this quantile of the maps' largest changes; the rest saturate


def shared_limit(largest: list[float] | np.ndarray, quantile: float = SCALE_QUANTILE) -> float:
    """The colour scale's half-range for maps whose largest absolute changes are ``largest`` (one per map).

    Not the overall maximum: measured on 100 of the sample's images (the demo model), the median map's
    largest change was 0.036 and the largest 0.373, so on a max scale most maps were drawn invisibly faint.
    At the 95th percentile the few stronger maps saturate (the colour bar says so) and the rest stay
    comparable. Never 0 (all-zero maps)."""
    values = np.asarray(largest, dtype=np.float64)
    return float(np.quantile(values, quantile)) if values.size and values.max() > 0 else 1e-6


def render(original: Image.Image, grid: np.ndarray, limit: float, title: str, note: str = "", saturated: bool = False) -> Image.Image:
    """The figure: ``original`` (at its size, shrunk above ``MAX_SIDE``) with ``grid`` ``[gh, gw]`` over it, and a band
    below with ``title``, the colour bar of ±``limit`` and the lines of ``note``. The image sits at the top,
    centred (the band is at least ``MIN_WIDTH`` wide)."""
    import matplotlib

    shown = original.convert("RGB")
    if max(shown.size) > MAX_SIDE:
        shown.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    w, h = shown.size
    values = np.asarray(Image.fromarray(np.asarray(grid, dtype=np.float32), mode="F").resize((w, h), Image.Resampling.NEAREST))
    scaled = np.clip(values / limit, -1.0, 1.0)  # [h, w] in [-1, 1]
    colours = matplotlib.colormaps[CMAP]((scaled + 1) / 2)[..., :3] * 255.0  # [h, w, 3]
    alpha = MAX_ALPHA * np.abs(scaled)[..., None]
    blended = (1 - alpha) * np.asarray(shown, dtype=np.float32) + alpha * colours
    overlay = Image.fromarray(np.rint(blended).clip(0, 255).astype(np.uint8))

    width = max(w, MIN_WIDTH)
    font = ImageFont.load_default(size=max(11, min(18, width // 32)))
    line = int(font.size * 1.4)
    notes = note.splitlines()
    band = (3 + len(notes)) * line + 8
    canvas = Image.new("RGB", (width, h + band), "white")
    canvas.paste(overlay, ((width - w) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    top = h + 4
    draw.text((6, top), title, fill="black", font=font)
    _colour_bar(canvas, draw, font, (6, top + line, width - 6, top + 2 * line - 4), limit, saturated)
    for k, text in enumerate(notes):
        draw.text((6, top + (3 + k) * line), text, fill=(60, 60, 60), font=font)
    return canvas


def _colour_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, box: tuple[int, int, int, int], limit: float,
                saturated: bool = False) -> None:
    """A horizontal bar of the colour map from -limit to +limit, in the colours the overlay blends at full strength,
    with its three numbers under it (``≤``/``≥`` at the ends when some maps go beyond the scale)."""
    import matplotlib

    x0, y0, x1, y1 = box
    ramp = np.linspace(-1.0, 1.0, max(2, x1 - x0))
    rgb = matplotlib.colormaps[CMAP]((ramp + 1) / 2)[:, :3] * 255.0
    white = np.full(3, 255.0)
    alpha = MAX_ALPHA * np.abs(ramp)[:, None]
    row = ((1 - alpha) * white + alpha * rgb).clip(0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(row[None], max(1, y1 - y0), axis=0)), (x0, y0))
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(120, 120, 120))
    label_y = y1 + 1
    low, high = ("<= ", ">= ") if saturated else ("", "")
    for text, anchor_x, anchor in ((f"{low}-{limit:.3g}", x0, "la"), ("0", (x0 + x1) // 2, "ma"), (f"{high}+{limit:.3g}", x1, "ra")):
        draw.text((anchor_x, label_y), text, fill="black", font=font, anchor=anchor)


def save(path: Path, figure: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path, format="PNG", optimize=False)


def draw_all(predictions: Path, maps_root: Path, input_root: Path, class_names: list[str]) -> dict:
    """The figure of every predicted image of a finished job, ``<map>.png`` beside its ``<map>.npy``, on one scale.

    ``predictions``: the job's Parquet shards (path, ok, predicted_class, prob_<class>). Two passes over the
    maps (the scale needs them all; each is L floats), the predictions read one batch at a time. An image
    whose map or original cannot be read now (moved since) gets no figure and is counted in ``skipped``.
    Returns ``{"figures", "skipped", "limit"}``."""
    import pyarrow.dataset as pads

    from pipelines.data import images
    from pipelines.progress import Progress

    dataset = pads.dataset(str(predictions), format="parquet")
    columns = ["path", "ok", "predicted_class", *(f"prob_{c}" for c in class_names)]

    def rows():
        for batch in dataset.to_batches(columns=columns, filter=pads.field("ok")):
            yield from batch.to_pylist()

    largest = []  # per map: its largest absolute change (one float a map)
    for row in rows():
        npy = Path(f"{heatmap_path(maps_root, input_root, row['path'])}.npy")
        if npy.is_file():
            largest.append(float(np.abs(np.load(npy)).max(initial=0.0)))
    count, limit = len(largest), shared_limit(largest)
    saturated = bool(largest) and max(largest) > limit
    drawn, skipped = 0, 0
    with Progress("heatmap figures", total=count, unit="images") as progress:
        for row in rows():
            dest = heatmap_path(maps_root, input_root, row["path"])
            npy = Path(f"{dest}.npy")
            original = images.load_image(row["path"], "RGB") if npy.is_file() else None
            if original is None or isinstance(original, images.Rejected):
                skipped += 1
                continue
            name, cls = Path(row["path"]).name, row["predicted_class"]
            title = f"{name}: predicted {cls}, p = {row[f'prob_{cls}']:.2f}"
            note = (f"drop in p({cls}) when the patch is left out\n"
                    f"red: evidence for {cls}, blue: against; one scale, {count} maps")
            save(Path(f"{dest}.png"), render(original, np.load(npy), limit, title, note, saturated))
            drawn += 1
            progress.update(1)
    return {"figures": drawn, "skipped": skipped, "limit": limit, "beyond_scale": sum(v > limit for v in largest)}
