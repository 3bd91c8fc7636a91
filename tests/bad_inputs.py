"""A corpus of bad inputs for ``msmae``, generated in a temporary folder (no binary is committed).

Each builder writes the smallest thing that shows one fault: a few-pixel PNG or JPEG drawn by
PIL, a PNG header that claims 20000 x 20000 pixels (PIL refuses it as a decompression bomb
before reading any pixel, so no 1.2 GB image is ever made), broken and looping symlinks, a
FIFO, manifests with missing-value tokens, YAML with syntax errors, and a checkpoint folder
holding a random-weight classifier (what ``evaluate`` / ``predict`` load, no training needed).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int = 0, size: tuple[int, int] = (24, 20), fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A deterministic noise image, distinct per seed (so no two are accidental duplicates)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (24, 20), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, size, fmt))
    return path


def image_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """An ImageFolder with ``counts[class]`` distinct PNGs per class."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{name}_{i}.png", seed=seed + 100 * c + i)
    return root


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A PNG whose header claims ``side`` x ``side`` RGB pixels and holds none."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def symlink(path: Path, target: str | Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def manifest_csv(path: Path, image_root: Path, labels: list[str]) -> Path:
    """One image per label under ``image_root`` (``img_<i>.png``) and a CSV listing them with ``labels``."""
    lines = ["image,label"]
    for i, label in enumerate(labels):
        write_image(image_root / f"img_{i}.png", seed=500 + i)
        lines.append(f"img_{i},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def text(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def checkpoint_folder(path: Path, class_names: list[str], img_size: int = 32) -> Path:
    """A checkpoint folder as a fine-tuning stage writes it (``state.pt``), holding a random-weight tiny classifier."""
    import msmae
    from pipelines.checkpoint import STATE_FILE, save_classifier

    model = msmae.build_classifier(msmae.get_preset("tiny", img_size), len(class_names), drop_path_rate=0.0)
    path.mkdir(parents=True, exist_ok=True)
    save_classifier(path / STATE_FILE, model, class_names)
    return path


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to assert that a refused command changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
