"""pipelines/data/near_duplicates.py: planted near-copies of real BTMD slices (the bundled sample) are
joined, different slices are not, checked against an independent measure (Pearson correlation of
32×32 grey thumbnails); the blocked pair search equals a brute-force loop; groups and queries."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipelines.data import near_duplicates as nd

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample" / "btmd"
T = nd.DEFAULT_THRESHOLD


def corr32(a: Image.Image, b: Image.Image) -> float:
    """The independent measure: Pearson correlation of 32×32 bilinear grey thumbnails."""
    x, y = (np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), np.float64).ravel() for im in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def load(rel: str) -> Image.Image:
    with Image.open(SAMPLE / rel) as im:
        return im.convert("RGB")  # as ingest normalises it


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


EDITS = {  # the sample is 96 px: 1 px per side is ~2 px at 224
    "jpeg q30": lambda im: jpeg(im, 30),
    "resize 64": lambda im: im.resize((64, 64), Image.Resampling.BILINEAR),
    "resize 224": lambda im: im.resize((224, 224), Image.Resampling.BICUBIC),
    "crop 1px/side": lambda im: im.crop((1, 1, im.width - 1, im.height - 1)),
    "shift 1px": lambda im: im.crop((1, 1, im.width, im.height)),
    "brightness +20": lambda im: Image.fromarray(np.clip(np.asarray(im, np.int16) + 20, 0, 255).astype(np.uint8)),
    "brightness x1.2": lambda im: ImageEnhance.Brightness(im).enhance(1.2),
    "crop+resize+jpeg": lambda im: jpeg(im.crop((1, 1, im.width - 1, im.height - 1)).resize((128, 128), Image.Resampling.BILINEAR), 60),
}
ORIGINALS = ["glioma/Tr-gl_0056.jpg", "meningioma/Tr-me_1303.jpg", "notumor/Tr-no_0029.jpg", "pituitary/Tr-pi_0593.jpg"]


@pytest.mark.parametrize("rel", ORIGINALS)
def test_edited_copies_are_near_duplicates(rel: str, tmp_path: Path) -> None:
    original = load(rel)
    fp = nd.fingerprint(original)
    for k, (name, edit) in enumerate(EDITS.items()):
        path = tmp_path / f"copy{k}.png"
        edit(original).save(path)  # a planted copy on disk, read back as ingest would
        copy = load_path(path)
        assert corr32(original, copy) > 0.97, f"{rel} {name}: the independent measure says this is not a copy"
        sim = nd.similarity(fp, nd.fingerprint(copy))
        assert sim >= T, f"{rel} {name}: similarity {sim:.4f} < {T}"
    ref = np.stack([fp, nd.fingerprint(load(ORIGINALS[(ORIGINALS.index(rel) + 1) % 4]))])
    queries = nd.fingerprints(edit(original) for edit in EDITS.values())
    idx, sim = nd.best_match(ref, queries)
    assert (idx == 0).all() and (sim >= T).all()
    assert nd.seen_in(ref, queries).all()


def load_path(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.mark.parametrize(("a", "b"), [
    ("glioma/Tr-gl_0056.jpg", "glioma/Tr-gl_0069.jpg"),  # different patients, similar axial slices
    ("glioma/Tr-gl_0183.jpg", "glioma/Tr-gl_0237.jpg"),
    ("notumor/Tr-no_0029.jpg", "notumor/Tr-no_0192.jpg"),
])
def test_different_images_are_not_joined(a: str, b: str) -> None:
    ia, ib = load(a), load(b)
    assert corr32(ia, ib) < 0.95
    assert nd.similarity(nd.fingerprint(ia), nd.fingerprint(ib)) < T
    assert not nd.seen_in(nd.fingerprints([ia]), nd.fingerprints([ib]))[0]


def test_sample_pairs_agree_with_the_independent_measure() -> None:
    """On the whole 600-image sample: every pair the independent measure calls a copy (r > 0.99)
    is found, and every pair found is at least r > 0.95 by it."""
    paths = sorted(SAMPLE.rglob("*.jpg"))
    imgs = [load_path(p) for p in paths]
    pairs = nd.find_near_duplicate_pairs(nd.fingerprints(imgs), T)
    x = np.stack([np.asarray(im.convert("L").resize((32, 32), Image.Resampling.BILINEAR), np.float64).ravel() for im in imgs])
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = x @ x.T
    iu = np.triu_indices(len(imgs), 1)
    copies = {(int(i), int(j)) for i, j in zip(*iu, strict=True) if c[i, j] > 0.99}
    found = {(int(i), int(j)) for i, j in zip(pairs["i"], pairs["j"], strict=True)}
    assert copies, "the sample has byte-identical and re-processed copies"
    assert copies <= found
    assert min(c[i, j] for i, j in found) > 0.95


def brute_force_pairs(fps: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    n = len(fps)
    return {(i, j) for i in range(n) for j in range(i + 1, n) if nd.similarity(fps[i], fps[j]) >= threshold}


def test_pair_search_equals_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nd, "_BLOCK", 37)  # several blocks, ragged edges, off-diagonal and diagonal
    rng = np.random.default_rng(0)
    base = rng.normal(0, 40, (120, nd.FINGERPRINT_BYTES))
    noisy = base[rng.integers(0, 120, 60)] + rng.normal(0, rng.uniform(0.5, 10, (60, 1)), (60, nd.FINGERPRINT_BYTES))
    fps = np.clip(np.round(np.concatenate([base, noisy])), -127, 127).astype(np.int8)
    fps[5] = 0  # a flat image: similar to nothing
    for threshold in (0.9, T, 0.995):
        pairs = nd.find_near_duplicate_pairs(fps, threshold)
        got = set(zip(pairs["i"].tolist(), pairs["j"].tolist(), strict=True))
        want = brute_force_pairs(fps, threshold)
        borderline = {(i, j) for i, j in want ^ got if abs(nd.similarity(fps[i], fps[j]) - threshold) < 1e-5}
        assert got ^ want <= borderline
        assert len(want) >= 5
        assert (pairs["i"] < pairs["j"]).all() and (np.diff(pairs["i"]) >= 0).all()
        assert np.allclose(pairs["similarity"], [nd.similarity(fps[i], fps[j]) for i, j in zip(pairs["i"], pairs["j"], strict=True)], atol=1e-5)


def test_groups_are_transitive_with_smallest_row_ids() -> None:
    pairs = np.array([(3, 7, 0.99), (1, 7, 0.99), (4, 5, 0.99)], dtype=nd.PAIR_DTYPE)
    assert nd.near_duplicate_groups(9, pairs).tolist() == [0, 1, 2, 1, 4, 4, 6, 1, 8]
    base = ["a", "b", "c", "d", "e", "f", "c", "h", "b"]  # e.g. pixel-hash / manifest groups
    assert nd.near_duplicate_groups(9, pairs, base_groups=base).tolist() == [0, 1, 2, 1, 4, 4, 2, 1, 1]
    assert nd.near_duplicate_groups(3, np.empty(0, dtype=nd.PAIR_DTYPE)).tolist() == [0, 1, 2]


def test_fingerprint_format_and_storage_round_trip() -> None:
    img = load(ORIGINALS[0])
    fp = nd.fingerprint(img)
    assert fp.dtype == np.int8 and fp.shape == (nd.FINGERPRINT_BYTES,) and len(fp.tobytes()) == 256
    assert np.array_equal(fp, nd.fingerprint(img.convert("L")))  # grey and RGB of a grey scan agree
    stored = [nd.fingerprint(load(r)).tobytes() for r in ORIGINALS]  # as in a Parquet binary column
    assert np.array_equal(nd.as_array(stored), nd.fingerprints(load(r) for r in ORIGINALS))
    assert nd.similarity(stored[0], fp) == pytest.approx(1.0)
    flat = nd.fingerprint(Image.new("L", (50, 40), 128))
    assert not flat.any() and nd.similarity(flat, fp) == 0.0
    empty = nd.find_near_duplicate_pairs(np.zeros((0, nd.FINGERPRINT_BYTES), np.int8))
    assert len(empty) == 0 and empty.dtype == nd.PAIR_DTYPE
    assert nd.seen_in([], [fp]).tolist() == [False]
    with pytest.raises(ValueError):
        nd.as_array(np.zeros((2, 64), np.int8))
