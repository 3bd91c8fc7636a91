"""What a model needs done to an image before it sees it, declared once and carried with the model.

Training reads images that ingest decoded and normalised (``pipelines.data.images``: 16-bit contrast,
alpha on black, CMYK and palette converted, DICOM windowed), optionally downscaled to
``max_side``, stored, then decoded with ``.convert("RGB")``, resized whole to ``img_size``
(bicubic) and normalised with ImageNet's mean/std (``pipelines.data.transforms``). ``Preprocessing``
replays exactly that chain on a file path, encoded bytes or a pixel array, so ``msmae predict``,
``msmae evaluate`` (through ingest) and the served model all see what training saw. numpy and
PIL only: it travels inside the registered model and runs in Ray Data workers.
``load_for_predict`` is ``msmae predict``'s decode step over a batch of listed files, the same
recipe applied file by file, so that every failure becomes that file's row.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines.data import images, near_duplicates
from pipelines.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, resize_whole

Source = str | Path | bytes | bytearray | np.ndarray


@dataclass(frozen=True)
class Preprocessing:
    """The decode-and-resize recipe of one model (all of it stored in the model's metadata)."""

    img_size: int
    mode: str = "RGB"  # the pixel mode the training data was ingested in (RGB or L); fed as RGB
    max_side: int | None = None  # ingest's --max-side (LANCZOS downscale before storing), if any
    interpolation: str = "bicubic"  # resize of the whole image to img_size x img_size
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.mode not in images.SUPPORTED_MODES:
            raise ValueError(f"preprocessing.mode must be one of {images.SUPPORTED_MODES}, got {self.mode!r}")
        if tuple(self.mean) != IMAGENET_MEAN or tuple(self.std) != IMAGENET_STD or self.interpolation != "bicubic":
            raise ValueError("preprocessing: only ImageNet mean/std and bicubic resizing are implemented "
                             f"(got mean {self.mean}, std {self.std}, {self.interpolation})")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    def decode(self, source: Source, suffix: str = "") -> Image.Image | images.Rejected:
        """The image as training stored it (normalised mode, ingest's downscale), or why it is not usable."""
        if isinstance(source, (str, Path)):
            img = images.load_image(source, self.mode)
        elif isinstance(source, (bytes, bytearray)):
            img = images.decode_bytes(bytes(source), suffix, self.mode)
        elif isinstance(source, np.ndarray):
            img = images.from_array(source, self.mode)
        else:
            return images.Rejected(images.NOT_AN_IMAGE, f"expected a path, image bytes or a pixel array, got {type(source).__name__}")
        if isinstance(img, images.Rejected):
            return img
        return images.downscale(img, self.max_side)

    def pixels(self, img: Image.Image) -> np.ndarray:
        """A decoded image -> the model's input ``[3, S, S]`` float32 (what ``transforms.resize_batch`` makes)."""
        return normalise(resize_whole(img.convert("RGB"), self.img_size))

    def __call__(self, source: Source, suffix: str = "") -> np.ndarray | images.Rejected:
        """Path, bytes or array -> ``[3, S, S]`` model input, or why not."""
        img = self.decode(source, suffix)
        return img if isinstance(img, images.Rejected) else self.safe_pixels(img)

    def safe_pixels(self, img: Image.Image) -> np.ndarray | images.Rejected:
        """``pixels``, or the image's rejection when resizing it fails (a truncated file decodes lazily)."""
        try:
            return self.pixels(img)
        except (OSError, ValueError, MemoryError) as e:
            return images.Rejected(images.CORRUPT, f"{type(e).__name__}: {e}")


def text_column(values) -> np.ndarray:
    """A nullable string column as an object array of str / None (Ray's numpy batches give NaN for a null string)."""
    return np.array([v if isinstance(v, str) else None for v in values], dtype=object)


def load_for_predict(batch: dict[str, np.ndarray], preprocessing: dict, max_file_bytes: int) -> dict[str, np.ndarray]:
    """Listing rows (path, problem, detail) → path, pixels uint8 [B, S, S, 3], ok, reason, detail.

    Each file is decoded as the model's training data was (``preprocessing``, the model's
    ``Preprocessing.to_dict()``: ingest's decode — 16-bit contrast, alpha on black, DICOM
    windowing — in the dataset's channel mode, with its ``--max-side`` downscale) and resized
    whole, bicubic, as evaluation does. Anything that goes
    wrong with one file, of any kind, is that file's row (``ok`` false, a reason, a detail, zero
    pixels), never the batch's failure: a decompression bomb is ``too_large``, a file over
    ``max_file_bytes`` is ``too_large`` without being read. Pixels stay uint8 (a quarter of the
    float32 bytes through the object store); the scoring actor normalises them.
    """
    recipe = Preprocessing.from_dict(preprocessing)
    size = recipe.img_size
    paths = batch["path"]
    n = len(paths)
    pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
    fingerprints = np.zeros((n, near_duplicates.FINGERPRINT_BYTES), dtype=np.int8)  # for the seen_in_training flag
    ok = np.zeros(n, dtype=bool)
    reason, detail = text_column(batch["problem"]), text_column(batch["detail"])
    for k in range(n):
        if reason[k] is not None:
            continue  # the listing already knows why (broken link, FIFO, loop, unreadable folder)
        try:
            nbytes = os.stat(paths[k]).st_size
            if nbytes > max_file_bytes:
                reason[k], detail[k] = images.TOO_LARGE, f"file is {nbytes} bytes, above predict's limit of {max_file_bytes}"
                continue
            image = recipe.decode(paths[k])
            if isinstance(image, images.Rejected):
                reason[k], detail[k] = image.reason, image.detail
                continue
            pixels[k] = np.asarray(resize_whole(image.convert("RGB"), size))
            fingerprints[k] = near_duplicates.fingerprint(image)
            ok[k] = True
        except MemoryError as e:
            reason[k], detail[k] = images.TOO_LARGE, f"MemoryError: {e}"
        except Exception as e:  # noqa: BLE001 - one file's failure, whatever it is, is that file's row
            reason[k], detail[k] = images.CORRUPT, f"{type(e).__name__}: {e}"
    return {"path": paths, "pixels": pixels, "fingerprint": fingerprints, "ok": ok, "reason": reason, "detail": detail}
