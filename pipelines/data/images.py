"""Decode, validate, normalise and hash one image file — the per-file work of ingest.

Everything here is a pure function of (file bytes, options), so it can run in a process
pool and its results are reproducible: the same file always gives the same hash and the
same stored bytes. A file that cannot be turned into a usable image is never dropped: it
comes back as a `Rejected` with a machine-readable reason for `quarantine.csv`.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipelines.data import near_duplicates

# Quarantine reasons (the `reason` column of quarantine.csv).
MISSING_FILE = "missing_file"
ZERO_BYTE = "zero_byte"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too_large"
UNSUPPORTED_MODE = "unsupported_mode"
DICOM_UNAVAILABLE = "dicom_unavailable"
UNREADABLE = "unreadable"  # exists, but this process may not read it (permissions)
MIN_SIDE = "min_side"  # decodes, but its shorter side is below --min-side (a 1x1 image teaches nothing)

DEFAULT_MIN_SIDE = 8

SUPPORTED_MODES = ("RGB", "L")
# Formats whose bytes we store unchanged when no resize is needed (and the mode allows it,
# ``_decodes_same``): every Ray Data / PIL worker decodes them to the normalised pixels, so
# re-encoding would only lose quality.
_PASS_THROUGH_FORMATS = {"JPEG", "PNG"}


@dataclass(frozen=True)
class Accepted:
    """A decoded, valid image: its content hash and the bytes to store."""

    content_hash: str  # hex digest of the normalised pixels (before any downscale)
    data: bytes  # encoded image; decodes, after .convert(mode), to the normalised image
    width: int
    height: int
    source_format: str
    source_mode: str
    fingerprint: bytes = b""  # near_duplicates.fingerprint of the stored image (near-copies across re-encodes)


@dataclass(frozen=True)
class Rejected:
    """A file that is not a usable image, and why."""

    reason: str
    detail: str


def process_file(path: str, mode: str = "RGB", max_side: int | None = None, min_side: int = 1) -> Accepted | Rejected:
    """Read `path` once, validate it fully, normalise its mode and size, hash the pixels.

    The hash is taken over the normalised pixels, not the file bytes, so byte-identical
    files and pixel-identical re-encodings (e.g. the same scan saved as PNG twice) group
    together. It is taken before `max_side` downscaling, so changing `max_side` does not
    change which images count as duplicates. An image whose stored shorter side is below
    `min_side` is rejected (`min_side`): it would be upsampled into a blur of one colour.
    """
    if mode not in SUPPORTED_MODES:
        raise ValueError(f"mode must be one of {SUPPORTED_MODES}, got {mode!r}")
    raw = _read_bytes(path)
    if isinstance(raw, Rejected):
        return raw
    decoded = _decode(raw, Path(path).suffix, mode)
    if isinstance(decoded, Rejected):
        return decoded
    normalised, fmt, src_mode = decoded
    resized = downscale(normalised, max_side)
    if min(resized.size) < min_side:
        return Rejected(MIN_SIDE, f"image is {resized.width}x{resized.height} px; its shorter side is below --min-side {min_side}")
    if resized is normalised and fmt in _PASS_THROUGH_FORMATS and _decodes_same(src_mode, mode):
        data = raw
    else:
        data = encode_png(resized)
    return Accepted(pixel_hash(normalised), data, resized.width, resized.height, fmt, src_mode,
                    near_duplicates.fingerprint(resized).tobytes())


def _decodes_same(src_mode: str, mode: str) -> bool:
    """May the source bytes be stored unchanged? Readers decode stored bytes with ``.convert("RGB")``
    (``pipelines.data.transforms.decode``), so the stored file must give the normalised image under that
    conversion: true for RGB->RGB, L->L and L->RGB (a grey image replicated either way), false for
    RGB->L (the reader would see colour where ingest, and inference, see grey)."""
    return src_mode == mode or (src_mode == "L" and mode == "RGB")


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image | Rejected:
    """One file decoded and normalised exactly as ingest does it (16-bit contrast, alpha on black,
    DICOM windowing), or why it cannot be: inference must see what training saw."""
    raw = _read_bytes(path)
    if isinstance(raw, Rejected):
        return raw
    return decode_bytes(raw, Path(path).suffix, mode)


def decode_bytes(raw: bytes, suffix: str = "", mode: str = "RGB") -> Image.Image | Rejected:
    """Encoded image bytes (PNG, JPEG, TIFF, DICOM, ...) decoded and normalised as ingest does it.

    ``suffix`` is the file's extension when known (``.dcm``); DICOM is also recognised by its
    ``DICM`` preamble, so bytes sent to the served model need no name."""
    if not raw:
        return Rejected(ZERO_BYTE, "image is empty (0 bytes)")
    decoded = _decode(raw, suffix, mode)
    return decoded if isinstance(decoded, Rejected) else decoded[0]


def from_array(array: np.ndarray, mode: str = "RGB") -> Image.Image | Rejected:
    """A pixel array (H×W grey, H×W×3 RGB, H×W×4 RGBA; uint8, 16-bit or float) normalised as ingest
    normalises a decoded file: integer data wider than 8 bits and float data are stretched over
    their own range (as 16-bit PNGs are), alpha is composited on black."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or min(arr.shape[:2]) < 1:
        return Rejected(UNSUPPORTED_MODE, f"array of shape {arr.shape}: expected H x W, H x W x 3 or H x W x 4")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number):
            return Rejected(UNSUPPORTED_MODE, f"array of dtype {arr.dtype}: expected numbers")
        arr = _to_uint8(arr.astype(np.float64))  # stretched over its own range, as a 16-bit PNG is
    img = Image.fromarray(np.ascontiguousarray(arr))  # uint8: H x W -> L, x3 -> RGB, x4 -> RGBA
    try:
        return to_mode(img, mode)
    except _UnsupportedMode as e:
        return Rejected(UNSUPPORTED_MODE, str(e))


def _read_bytes(path: str | Path) -> bytes | Rejected:
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return Rejected(MISSING_FILE, f"{path} does not exist")
    except PermissionError as e:
        return Rejected(UNREADABLE, f"permission denied: {e.strerror}")
    except OSError as e:
        return Rejected(CORRUPT, f"cannot read file: {e}")
    return raw if raw else Rejected(ZERO_BYTE, "file is empty (0 bytes)")


def _decode(raw: bytes, suffix: str, mode: str) -> tuple[Image.Image, str, str] | Rejected:
    """(normalised image, source format, source mode), or why the bytes are not a usable image."""
    if suffix.lower() == ".dcm" or raw[128:132] == b"DICM":
        return _decode_dicom(raw, mode)
    return _decode_raster(raw, mode)


def _decode_raster(raw: bytes, mode: str) -> tuple[Image.Image, str, str] | Rejected:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not be padded grey
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()  # full decode: catches truncation and corrupt data, not just headers
            fmt, src_mode = img.format or "unknown", img.mode
            normalised = to_mode(img, mode)
    except UnidentifiedImageError:
        return Rejected(NOT_AN_IMAGE, "not a recognised image format")
    except Image.DecompressionBombError as e:
        return Rejected(TOO_LARGE, str(e))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        reason = TRUNCATED if "truncat" in msg.lower() else CORRUPT
        return Rejected(reason, msg or type(e).__name__)
    except _UnsupportedMode as e:
        return Rejected(UNSUPPORTED_MODE, str(e))
    return normalised, fmt, src_mode


def _decode_dicom(raw: bytes, mode: str) -> tuple[Image.Image, str, str] | Rejected:
    """DICOM: modality LUT, then the file's own VOI window (centre/width) when it has one."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        return Rejected(DICOM_UNAVAILABLE, "DICOM needs pydicom (a dependency of msmae-ray): pip install pydicom")
    try:
        ds = pydicom.dcmread(io.BytesIO(raw))
        arr = ds.pixel_array
        if arr.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
            arr = arr[0]  # multi-frame: the first frame stands for the study
        if ds.get("SamplesPerPixel", 1) == 1:
            arr = apply_modality_lut(arr, ds)
            arr = apply_voi_lut(arr, ds)  # no-op when the file declares no window
            arr = _to_uint8(np.asarray(arr, dtype=np.float64))
            if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
                arr = 255 - arr  # MONOCHROME1 means high values are dark
            img = Image.fromarray(arr)
        else:
            img = Image.fromarray(_to_uint8(np.asarray(arr, dtype=np.float64)))
    except Exception as e:  # pydicom raises many types for bad or unsupported files
        return Rejected(CORRUPT, f"DICOM: {type(e).__name__}: {e}")
    try:
        return to_mode(img, mode), "DICOM", img.mode
    except _UnsupportedMode as e:
        return Rejected(UNSUPPORTED_MODE, str(e))


class _UnsupportedMode(Exception):
    pass


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode we meet in medical data to `mode` ("RGB" or "L").

    PIL's plain `convert` is wrong for two common cases: 16/32-bit grayscale (it clips to
    0..255, turning most 12/16-bit scans white) and transparency (it drops alpha, exposing
    whatever colour hid under it). Those are handled explicitly.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float64)))
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        black = Image.new("RGBA", img.size, (0, 0, 0, 255))  # scans sit on black
        img = Image.alpha_composite(black, img.convert("RGBA")).convert("RGB")
    if img.mode not in ("RGB", "L", "CMYK", "YCbCr", "1", "LAB", "HSV"):
        raise _UnsupportedMode(f"cannot convert PIL mode {img.mode!r} to {mode}")
    return img if img.mode == mode else img.convert(mode)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Stretch the image's own value range to 0..255 (why: 12-bit data in 16-bit containers)."""
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.round((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def downscale(img: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is at most `max_side`, keeping aspect; never enlarge."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def pixel_hash(img: Image.Image) -> str:
    """Hash of mode, size and pixels: equal iff the normalised images are identical."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def encode_png(img: Image.Image) -> bytes:
    """Lossless re-encoding for images we had to change (mode, size, DICOM)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()
