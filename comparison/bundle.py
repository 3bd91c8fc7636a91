"""A dataset in one small file: JPEG bytes at a fixed side, labels, splits, class names.

A GPU box that has torch but none of the data stack (Parquet, Ray) still has to train on
the same images and the same train / val / test split as the pipeline. A bundle carries
exactly that: every image squashed to ``side × side`` and re-encoded as JPEG (all bytes
in one tensor, ``offsets`` marking where each image starts), plus its label, split,
ingest index and the source's aspect ratio (width / height), which crop sampling needs
to draw crops in the source's pixel proportions. Loading needs torch and torchvision only
and decodes the whole bundle once, on the GPU where torchvision can.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class Bundle:
    """All images of a dataset as JPEG bytes plus per-image metadata (CPU tensors)."""

    name: str
    classes: list[str]
    side: int
    jpeg: torch.Tensor  # uint8 [total bytes]
    offsets: torch.Tensor  # int64 [N + 1]: image i is jpeg[offsets[i]:offsets[i + 1]]
    label: torch.Tensor  # int64 [N]
    split: torch.Tensor  # int8 [N], position in SPLITS
    index: torch.Tensor  # int64 [N], the ingested dataset's index
    aspect: torch.Tensor  # float32 [N], source width / height
    # lesion masks, squashed like their images (nearest), bit-packed row by row: uint8 [N, ceil(side*side / 8)];
    # None for a dataset without masks (and for bundles made before masks: they load as they are)
    mask: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None  # bool [N]: the image has a mask (else its row is all zeros)

    def __len__(self) -> int:
        return int(self.label.numel())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def rows(self, split: str) -> torch.Tensor:
        """Positions of a split's images, in stored order (train rows first, as ingested)."""
        return torch.nonzero(self.split == SPLITS.index(split)).flatten()

    def counts(self) -> dict[str, int]:
        return {name: int((self.split == k).sum()) for k, name in enumerate(SPLITS)}

    def masks(self, rows: torch.Tensor) -> torch.Tensor:
        """bool ``[n, side, side]`` lesion masks of ``rows`` (all False where an image has none)."""
        if self.mask is None:
            raise ValueError(f"bundle {self.name} has no lesion masks; rebuild it with make_bundle.py --masks")
        bits = torch.arange(7, -1, -1, dtype=torch.uint8)
        unpacked = (self.mask[rows.long()].unsqueeze(-1) >> bits) & 1  # [n, bytes, 8], most significant bit first
        return unpacked.flatten(1)[:, : self.side * self.side].reshape(-1, self.side, self.side).bool()

    def encoded(self, position: int) -> torch.Tensor:
        return self.jpeg[int(self.offsets[position]): int(self.offsets[position + 1])]


def encode_images(images: Iterable[torch.Tensor], quality: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``[3, S, S]`` images → (concatenated JPEG bytes, offsets ``[N + 1]``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parts = [encode_jpeg(img.contiguous(), quality=quality) for img in images]
    sizes = torch.tensor([0] + [p.numel() for p in parts], dtype=torch.int64)
    jpeg = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return jpeg, torch.cumsum(sizes, 0)


def make_bundle(
    name: str,
    classes: Sequence[str],
    images: Sequence[torch.Tensor],
    labels: Sequence[int],
    splits: Sequence[str],
    index: Sequence[int] | None = None,
    aspect: Sequence[float] | None = None,
    quality: int = 90,
) -> Bundle:
    """Build a bundle from already-resized uint8 ``[3, S, S]`` images (all the same side)."""
    if not images:
        raise ValueError("a bundle needs at least one image")
    side = images[0].shape[-1]
    bad = [i for i, img in enumerate(images) if tuple(img.shape) != (3, side, side) or img.dtype != torch.uint8]
    if bad:
        raise ValueError(f"images must all be uint8 [3, {side}, {side}]; image {bad[0]} is {tuple(images[bad[0]].shape)} {images[bad[0]].dtype}")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split names {unknown}; use {SPLITS}")
    n = len(images)
    if not (len(labels) == len(splits) == n):
        raise ValueError(f"need one label and one split per image: {n} images, {len(labels)} labels, {len(splits)} splits")
    jpeg, offsets = encode_images(images, quality)
    return Bundle(
        name=name,
        classes=list(classes),
        side=int(side),
        jpeg=jpeg,
        offsets=offsets,
        label=torch.as_tensor(list(labels), dtype=torch.int64),
        split=torch.tensor([SPLITS.index(s) for s in splits], dtype=torch.int8),
        index=torch.as_tensor(list(index) if index is not None else range(n), dtype=torch.int64),
        aspect=torch.as_tensor(list(aspect) if aspect is not None else [1.0] * n, dtype=torch.float32),
    )


def pack_masks(masks: Sequence[torch.Tensor | None], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool ``[side, side]`` masks (None: the image has none) -> (packed uint8 ``[N, ceil(side*side / 8)]``, has_mask ``[N]``)."""
    flat = torch.zeros(len(masks), -(-side * side // 8) * 8, dtype=torch.uint8)
    for k, m in enumerate(masks):
        if m is not None:
            flat[k, : side * side] = m.flatten().to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (flat.reshape(len(masks), -1, 8) * weights).sum(-1).to(torch.uint8)
    return packed, torch.tensor([m is not None for m in masks], dtype=torch.bool)


def save_bundle(bundle: Bundle, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **{k: getattr(bundle, k) for k in Bundle.__dataclass_fields__}}
    torch.save(state, path)
    return path


def load_bundle(path: str | Path) -> Bundle:
    """Read a bundle (tensors, strings and ints only: safe with ``weights_only``)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = state.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: bundle format {version}, this code reads {FORMAT_VERSION}; rebuild it")
    return Bundle(**state)


def decode_all(bundle: Bundle, device: torch.device | str = "cpu", chunk: int = 1024) -> torch.Tensor:
    """Every image as one uint8 ``[N, 3, S, S]`` tensor on ``device``.

    On CUDA, torchvision decodes a list of JPEGs in one batched nvJPEG call; elsewhere
    (or if the GPU decoder refuses) it decodes on the CPU and copies the result over.
    """
    device = torch.device(device)
    out = torch.empty(len(bundle), 3, bundle.side, bundle.side, dtype=torch.uint8, device=device)
    for start in range(0, len(bundle), chunk):
        stop = min(start + chunk, len(bundle))
        data = [bundle.encoded(i) for i in range(start, stop)]
        for k, img in enumerate(_decode(data, device)):  # row by row: no big CPU stack
            out[start + k] = img
    return out


def _decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():  # torchvision >= 0.29 announces a move of its codecs to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        if device.type == "cuda":
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # no nvJPEG in this build: CPU decode below
                pass
        return [img.to(device) for img in decode_jpeg(data, mode=ImageReadMode.RGB)]
