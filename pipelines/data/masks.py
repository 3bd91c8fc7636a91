"""Lesion masks as data: pair one mask with each image, check it, store it beside the image.

A mask is what the map-on-lesion metrics (``msmae.lesion_metrics``) score the attention maps
against. Two ways to name them (``msmae ingest``):

- ``--masks DIR``: ``DIR/<image_id>_segmentation.png`` (HAM10000's convention), where
  ``image_id`` is the image file's name without its extension;
- ``--mask-col COL`` (manifests): the column holds each image's mask path, relative to
  ``--masks DIR`` when given, else to ``--image-root`` (or absolute).

Checks, per kept image: the mask exists, decodes, has exactly the image's size (before any
``--max-side`` downscale, which is then applied to the mask too, nearest-neighbour), and is
binary; a grey mask (an anti-aliased edge, a JPEG) is thresholded at half its range and
counted. A mask that fails a check is quarantined with a reason in ``mask_quarantine.csv``;
its image stays in the dataset without a mask (it still trains and validates, it is just not
scored). Masks in ``DIR`` that no kept image claims are counted too. Nothing is dropped
silently. Stored masks are 1-bit PNGs (0 background, 255 lesion) in the shards' ``mask``
column (null for an image without one).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, UnidentifiedImageError

MASK_SUFFIX = "_segmentation.png"
MASK_QUARANTINE_FILE = "mask_quarantine.csv"

# mask_quarantine.csv reasons
MISSING_MASK = "missing_mask"
UNREADABLE_MASK = "unreadable_mask"
MASK_SIZE = "mask_size_mismatch"
EMPTY_MASK = "empty_mask"  # decodes, but marks no lesion pixel: nothing to score against


class MaskOptionError(ValueError):
    """--masks / --mask-col cannot be used as given (the message says what to change)."""


@dataclass(frozen=True)
class MaskSpec:
    """Where the masks are: a folder of ``<image_id>_segmentation.png``, a manifest column, or both."""

    folder: Path | None = None
    column: str | None = None

    def info(self) -> dict:
        return {"folder": str(self.folder.resolve()) if self.folder else None, "column": self.column}


@dataclass
class MaskReport:
    """What happened to the masks of one ingest (``dataset.json``'s ``masks``)."""

    spec: MaskSpec
    paired: int = 0
    thresholded: int = 0
    quarantine: list[dict] = field(default_factory=list)
    unclaimed: int = 0  # masks in the folder that no kept image claims (a typo in a name, a left-out image)

    def summary(self) -> dict:
        return {
            **self.spec.info(), "paired": self.paired, "thresholded": self.thresholded, "quarantined": len(self.quarantine),
            "quarantine_reasons": dict(sorted(Counter(q["reason"] for q in self.quarantine).items())), "unclaimed": self.unclaimed,
        }


def image_id(path_or_source: str) -> str:
    """``images/ISIC_0024306.jpg`` or ``ISIC_0024306`` -> ``ISIC_0024306``."""
    name = Path(path_or_source).name
    return name[: -len(Path(name).suffix)] if Path(name).suffix else name


def check_spec(spec: MaskSpec, manifest: Path | None) -> None:
    """Refuse options that cannot work, before anything is read."""
    if spec.column is not None and manifest is None:
        raise MaskOptionError("--mask-col names a manifest column: use it with --manifest (for a folder, use --masks DIR)")
    if spec.folder is not None and not spec.folder.is_dir():
        raise MaskOptionError(f"--masks {spec.folder} is not a folder")
    if spec.column is not None:
        from pipelines.data.sources import read_manifest

        columns = read_manifest(manifest).columns
        if spec.column not in columns:
            raise MaskOptionError(f"manifest {manifest}: column {spec.column!r} (--mask-col) not found; columns are {columns}")


def mask_paths(kept: list[dict], spec: MaskSpec, manifest: Path | None, image_col: str | None, image_root: Path | None) -> list[str | None]:
    """One mask path per kept row (None: none named)."""
    if spec.column is not None:
        from pipelines.data.sources import read_manifest

        table = read_manifest(manifest)
        if spec.column not in table.columns:
            raise MaskOptionError(f"manifest {manifest}: column {spec.column!r} (--mask-col) not found; columns are {table.columns}")
        named = dict(zip(table[image_col].str.strip_chars().to_list(), table[spec.column].to_list(), strict=True))
        base = spec.folder or image_root
        out: list[str | None] = []
        for k in kept:
            value = named.get(k["source"])
            value = value.strip() if isinstance(value, str) else None
            out.append(str(base / value) if value and not os.path.isabs(value) else value or None)
        return out
    return [str(spec.folder / f"{image_id(k['source'])}{MASK_SUFFIX}") for k in kept]


def original_size(path: str, stored: tuple[int, int]) -> tuple[int, int]:
    """The image file's own size (header only), which its mask must match; ``stored`` if PIL cannot say (DICOM)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError):
        return stored


def load_mask(path: str | None, image_size: tuple[int, int], stored_size: tuple[int, int]) -> tuple[bytes, bool] | tuple[str, str]:
    """``(1-bit PNG bytes at stored_size, thresholded?)`` or ``(reason, detail)``.

    ``image_size`` is the image file's size (what the mask must match), ``stored_size`` the
    size ingest stored the image at (``--max-side``), which the mask is resized to, nearest."""
    if path is None:
        return MISSING_MASK, "no mask named for this image (empty --mask-col cell)"
    try:
        with Image.open(path) as img:
            img.load()
            grey = np.asarray(img.convert("L"))
    except FileNotFoundError:
        return MISSING_MASK, f"{path} does not exist"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        return UNREADABLE_MASK, f"{path}: {e}"
    width, height = grey.shape[1], grey.shape[0]
    if (width, height) != tuple(image_size):
        return MASK_SIZE, f"{path} is {width}x{height} px, its image {image_size[0]}x{image_size[1]}: a mask must share its image's frame"
    values = np.unique(grey)
    thresholded = not set(values.tolist()) <= {0, 1, 255} or (1 in values and 255 in values)
    lesion = grey >= 128 if grey.max() > 1 else grey >= 1
    if not lesion.any():
        return EMPTY_MASK, f"{path} marks no lesion pixel"
    img = Image.fromarray(lesion)  # mode "1"
    if tuple(stored_size) != (width, height):
        img = img.resize(tuple(stored_size), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), thresholded


def attach_masks(kept: list[dict], spec: MaskSpec, manifest: Path | None = None, image_col: str | None = None,
                 image_root: Path | None = None) -> MaskReport:
    """Set ``mask`` (PNG bytes or None) on every kept row; the report counts and quarantines the rest."""
    report = MaskReport(spec)
    paths = mask_paths(kept, spec, manifest, image_col, image_root)
    claimed: set[str] = set()
    for row, path in zip(kept, paths, strict=True):
        res = row["res"]
        loaded = load_mask(path, original_size(row["path"], (res.width, res.height)), (res.width, res.height))
        if path is not None:
            claimed.add(os.path.realpath(path))  # claimed, whether it passed its checks or was quarantined
        if isinstance(loaded[0], bytes):
            row["mask"] = loaded[0]
            report.paired += 1
            report.thresholded += int(loaded[1])
        else:
            row["mask"] = None
            report.quarantine.append({"path": path or row["path"], "reason": loaded[0], "detail": loaded[1]})
    if spec.folder is not None and spec.column is None:
        present = {os.path.realpath(spec.folder / name) for name in os.listdir(spec.folder) if name.endswith(MASK_SUFFIX)}
        report.unclaimed = len(present - claimed)
    return report


def quarantine_csv(rows: list[dict]) -> bytes:
    df = pl.DataFrame(rows, schema={"path": pl.String, "reason": pl.String, "detail": pl.String})
    return df.sort(["reason", "path"]).write_csv().encode()


def fingerprint_bytes(spec: MaskSpec) -> bytes:
    """The mask folder's listing with each file's size and mtime (an edited mask changes the dataset),
    as the image listing is fingerprinted. A manifest column's masks are named by the manifest, whose
    bytes are fingerprinted already; their files' stats are added here when they sit in ``--masks``."""
    h = hashlib.sha256(repr(spec.info()).encode())
    if spec.folder is not None:
        for entry in sorted(os.scandir(spec.folder), key=lambda e: e.name):
            try:
                st = entry.stat()
                h.update(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(f"{entry.name}:missing".encode())
    return h.digest()


def decode_mask(data: bytes | None, size: tuple[int, int]) -> np.ndarray:
    """Stored mask bytes -> bool ``[H, W]`` at ``size`` = (width, height); all False for an image without one."""
    if data is None:
        return np.zeros((size[1], size[0]), dtype=bool)
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L")) > 0
