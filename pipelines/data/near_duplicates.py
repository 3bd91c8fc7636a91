"""Perceptual near-duplicate detection: the same picture re-encoded, resized, slightly cropped or
brightened, which a hash of the decoded pixels cannot see (issue 25).

numpy + PIL (and the union-find of ``splits``), no Ray: it runs inside ingest's decode worker
processes and inside the served model.

- ``fingerprint(img)``: the image in grey, resized to 16×16 with PIL's Lanczos filter, mean
  removed, scaled so the largest |value| is 127, stored as 256 int8 values (``FINGERPRINT_BYTES``).
- ``similarity(a, b)``: cosine of two fingerprints, i.e. the Pearson correlation of the two
  16×16 thumbnails: 1 for the same picture, invariant to brightness offset and contrast gain.
- ``find_near_duplicate_pairs``: every pair with similarity >= threshold, by blocked float32
  matrix products (exact, no candidate pruning; N²/2 dot products of 256 values: 100,000
  images took 76 s of CPU on 2 cores, benchmarks/bench_near_duplicates.py).
- ``near_duplicate_groups``: union-find over the pairs; each row gets the smallest row index of
  its group (the convention of ``splits.split_groups``).
- ``best_match`` / ``seen_in``: query fingerprints against a reference set (e.g. evaluated
  images against the training set's fingerprints).

Why this fingerprint and ``DEFAULT_THRESHOLD`` (measured on BTMD): see docs/data.md,
"Near-duplicates".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

FINGERPRINT_SIDE = 16
FINGERPRINT_BYTES = FINGERPRINT_SIDE * FINGERPRINT_SIDE  # int8 per value
# Stored beside fingerprints: a different recipe gives incomparable vectors.
FINGERPRINT_VERSION = "grey16-lanczos-int8-v1"
# Minimum cosine similarity for two images to count as the same picture (docs/data.md).
DEFAULT_THRESHOLD = 0.98

PAIR_DTYPE = np.dtype([("i", np.int64), ("j", np.int64), ("similarity", np.float32)])
_BLOCK = 4096  # rows/columns per matrix-product block: 4096² float32 = 64 MiB


def fingerprint(img: Image.Image) -> np.ndarray:
    """The image's perceptual fingerprint: ``FINGERPRINT_BYTES`` int8 values (``.tobytes()`` to store).

    Call it on the image as ingest normalised it (mode RGB or L; other modes go through PIL's
    ``convert("L")``, which clips 16-bit data).

    Grey (PIL's ITU-R 601 luma for colour), 16×16 Lanczos thumbnail, mean removed, scaled so the
    largest |value| is 127. A flat image (one grey level) gives all zeros: it is similar to nothing.
    """
    grey = img if img.mode == "L" else img.convert("L")
    small = grey.resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE), Image.Resampling.LANCZOS)
    v = np.asarray(small, dtype=np.float64).ravel()
    v = v - v.mean()
    peak = np.abs(v).max()
    if peak < 1e-6:
        return np.zeros(FINGERPRINT_BYTES, dtype=np.int8)
    return np.round(v * (127.0 / peak)).astype(np.int8)


def fingerprints(imgs: Iterable[Image.Image]) -> np.ndarray:
    """``fingerprint`` of each image, stacked: (N, FINGERPRINT_BYTES) int8."""
    rows = [fingerprint(im) for im in imgs]
    return np.stack(rows) if rows else np.zeros((0, FINGERPRINT_BYTES), dtype=np.int8)


def as_array(fps: np.ndarray | Sequence[bytes] | Sequence[np.ndarray]) -> np.ndarray:
    """Fingerprints as an (N, FINGERPRINT_BYTES) int8 array, from an array or a list of bytes
    (as stored in a Parquet binary column) or of arrays."""
    if isinstance(fps, np.ndarray) and fps.ndim == 2:
        arr = fps
    elif len(fps) == 0:
        return np.zeros((0, FINGERPRINT_BYTES), dtype=np.int8)
    else:
        arr = np.stack([np.frombuffer(f, dtype=np.int8) if isinstance(f, bytes | bytearray | memoryview) else np.asarray(f) for f in fps])
    if arr.ndim != 2 or arr.shape[1] != FINGERPRINT_BYTES:
        raise ValueError(f"fingerprints must have {FINGERPRINT_BYTES} values each, got shape {arr.shape}")
    return arr.astype(np.int8, copy=False)


def _unit(fps: np.ndarray) -> np.ndarray:
    """Rows as float32 unit vectors (a zero row stays zero: similarity 0 with everything)."""
    x = as_array(fps).astype(np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def similarity(a: np.ndarray | bytes, b: np.ndarray | bytes) -> float:
    """Cosine similarity of two fingerprints in [-1, 1]: 1 for the same picture."""
    u = _unit(as_array([a, b]))
    return float(u[0] @ u[1])


def find_near_duplicate_pairs(fps: np.ndarray | Sequence[bytes], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Every pair (i < j) with ``similarity >= threshold``, as a structured array with fields
    ``i``, ``j`` (row indices) and ``similarity``, sorted by (i, j).

    Exact: the upper triangle of the similarity matrix is computed in 4096×4096 float32 blocks
    (BLAS), so time grows as N² but with no Python loop per pair or per image.
    """
    u = _unit(fps)
    n = len(u)
    found: list[np.ndarray] = []
    for r0 in range(0, n, _BLOCK):
        rows = u[r0:r0 + _BLOCK]
        for c0 in range(r0, n, _BLOCK):
            s = rows @ u[c0:c0 + _BLOCK].T
            if c0 == r0:  # diagonal block: keep j > i only
                s[np.arange(s.shape[1])[None, :] <= np.arange(len(rows))[:, None]] = -np.inf
            ii, jj = np.nonzero(s >= threshold)
            if len(ii):
                out = np.empty(len(ii), dtype=PAIR_DTYPE)
                out["i"], out["j"], out["similarity"] = ii + r0, jj + c0, s[ii, jj]
                found.append(out)
    pairs = np.concatenate(found) if found else np.empty(0, dtype=PAIR_DTYPE)
    return np.sort(pairs, order=("i", "j"))


def near_duplicate_groups(n: int, pairs: np.ndarray, base_groups: Sequence[int] | None = None) -> np.ndarray:
    """Per row, the id of its near-duplicate group: the smallest row index in the group (joined
    transitively over ``pairs``). ``base_groups`` (optional, per row, e.g. ingest's hash/manifest
    split groups) are merged in: rows sharing a base group also share the result's group."""
    from pipelines.data.splits import UnionFind

    groups = UnionFind(n)
    if base_groups is not None:
        if len(base_groups) != n:
            raise ValueError(f"base_groups has {len(base_groups)} rows, expected {n}")
        first: dict = {}
        for row, g in enumerate(base_groups):
            groups.union(first.setdefault(g, row), row)
    for a, b in zip(np.asarray(pairs["i"]).tolist(), np.asarray(pairs["j"]).tolist(), strict=True):
        groups.union(a, b)
    return np.array([groups.find(x) for x in range(n)], dtype=np.int64)


def best_match(reference_fps: np.ndarray | Sequence[bytes], query_fps: np.ndarray | Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """For each query fingerprint, (index of its most similar reference fingerprint, that
    similarity); index -1 and similarity -inf when the reference set is empty."""
    ref, qry = _unit(reference_fps), _unit(query_fps)
    best_idx = np.full(len(qry), -1, dtype=np.int64)
    best_sim = np.full(len(qry), -np.inf, dtype=np.float32)
    for q0 in range(0, len(qry), _BLOCK):
        q = qry[q0:q0 + _BLOCK]
        for r0 in range(0, len(ref), _BLOCK):
            s = q @ ref[r0:r0 + _BLOCK].T
            k = s.argmax(axis=1)
            v = s[np.arange(len(q)), k]
            better = v > best_sim[q0:q0 + len(q)]
            best_sim[q0:q0 + len(q)][better] = v[better]
            best_idx[q0:q0 + len(q)][better] = k[better] + r0
    return best_idx, best_sim


def seen_in(reference_fps: np.ndarray | Sequence[bytes], query_fps: np.ndarray | Sequence[bytes], threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per query fingerprint, whether some reference fingerprint has ``similarity >= threshold``
    (e.g. which evaluated images are near-copies of training images)."""
    return best_match(reference_fps, query_fps)[1] >= threshold
