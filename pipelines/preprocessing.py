"""What a model needs done to an image before it sees it, declared once and carried with the model.

Training reads images that ingest decoded and normalised (``pipelines.images``: 16-bit contrast,
alpha on black, CMYK and palette converted, DICOM windowed), optionally downscaled to
``max_side``, stored, then decoded with ``.convert("RGB")``, resized whole to ``img_size``
(bicubic) and normalised with ImageNet's mean/std (``pipelines.transforms``). ``Preprocessing``
replays exactly that chain on a file path, encoded bytes or a pixel array, so ``msmae predict``,
``msmae evaluate`` (through ingest) and the served model all see what training saw. numpy and
PIL only: it travels inside the registered model and runs in Ray Data workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipelines import images
from pipelines.transforms import IMAGENET_MEAN, IMAGENET_STD, normalise, resize_whole

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
        if isinstance(img, images.Rejected):
            return img
        try:
            return self.pixels(img)
        except (OSError, ValueError, MemoryError) as e:
            return images.Rejected(images.CORRUPT, f"{type(e).__name__}: {e}")
