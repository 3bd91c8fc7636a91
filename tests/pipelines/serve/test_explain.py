"""Occlusion maps computed for several images per forward batch equal those of one image at a time, and the
figures a user reads are drawn over the original image at its own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import msmae
from pipelines.serve import explain, heatmap_figures


@pytest.fixture(scope="module")
def small_classifier() -> msmae.MSMAEClassifier:
    """A real classifier of the demo's geometry (64 px, 8 px patches), small and briefly trained on a
    learnable rule (class = brightest quadrant), so its maps are far from zero."""
    torch.manual_seed(0)
    preset = msmae.ViTPreset(64, 8, 64, 2, 2, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    model = msmae.build_classifier(preset, 4, drop_path_rate=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(15):
        x = torch.randn(16, 3, 64, 64)
        y = torch.randint(0, 4, (16,))
        for k in range(16):  # brighten the quadrant of the class
            r, c = divmod(int(y[k]), 2)
            x[k, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] += 2.0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_batched_occlusion_maps_equal_one_image_at_a_time(small_classifier):
    model = small_classifier
    pixels = torch.randn(3, 3, 64, 64)
    one_by_one = [explain.occlusion_maps(model, pixels[k:k + 1], temperature=0.8) for k in range(len(pixels))]
    alone = torch.cat([d for d, _ in one_by_one])
    for chunk in (None, 37, 64, 1000):  # the memory cap; forward batches that cut images apart; one image; everything at once
        batched, target = explain.occlusion_maps(model, pixels, temperature=0.8, chunk=chunk)
        assert batched.shape == (3, model.preset.num_patches)
        assert (batched - alone).abs().max().item() < 1e-5, chunk
        assert target.tolist() == [int(t) for _, t in one_by_one]
    assert alone.abs().max().item() > 1e-3  # the maps say something: the comparison is not of zeros


def test_the_memory_cap_stacks_several_images_per_forward_batch():
    tiny = msmae.PRESETS["tiny"]  # the demo's model: 64 patches, 65 tokens of 768 MLP floats an occluded sequence
    per_batch = explain.occlusion_batch(tiny)
    assert per_batch >= 2 * tiny.num_patches  # at least two whole images a forward pass
    assert explain.occlusion_batch(tiny, max_bytes=1) == 1
    assert per_batch * 64 * int(tiny.mlp_ratio * tiny.embed_dim) * 4 <= explain.OCCLUSION_BATCH_BYTES


def test_the_figure_is_the_original_image_at_its_own_size_with_a_band_below():
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))
    grid = np.zeros((8, 8), dtype=np.float32)
    figure = heatmap_figures.render(original, grid, limit=0.2, title="scan.png: predicted glioma, p = 0.83", note="a\nb")
    assert figure.width == 420 and figure.height > 300  # the image's own width; the band under it
    # a map of zeros changes nothing: the top of the figure is the original, pixel for pixel
    assert np.array_equal(np.asarray(figure)[:300], np.asarray(original))
    grid[0, 0] = 0.2  # evidence for the class in the top-left patch: red there, only there
    figure = np.asarray(heatmap_figures.render(original, grid, limit=0.2, title="t"), dtype=np.int32)
    corner, rest = figure[:300 // 8, :420 // 8], figure[300 // 8 + 2:300, 420 // 8 + 2:]
    before = np.asarray(original, dtype=np.int32)[:300 // 8, :420 // 8]
    assert (corner[..., 0] - corner[..., 2]).mean() > (before[..., 0] - before[..., 2]).mean() + 30  # red
    assert np.array_equal(rest, np.asarray(original, dtype=np.int32)[300 // 8 + 2:, 420 // 8 + 2:])


def test_a_large_image_is_shown_capped_and_a_small_one_gets_a_band_wide_enough_to_read():
    big = Image.new("RGB", (3000, 1500), "grey")
    figure = heatmap_figures.render(big, np.full((8, 8), 0.1, np.float32), limit=0.1, title="t")
    assert figure.width == heatmap_figures.MAX_SIDE and figure.height > heatmap_figures.MAX_SIDE // 2
    small = Image.new("RGB", (96, 96), "grey")
    figure = heatmap_figures.render(small, np.zeros((8, 8), np.float32), limit=0.1, title="t")
    assert figure.width == heatmap_figures.MIN_WIDTH
    left = (heatmap_figures.MIN_WIDTH - 96) // 2  # centred above the band, at its own size
    assert np.array_equal(np.asarray(figure)[:96, left:left + 96], np.asarray(small))


def test_the_colour_scale_is_shared_and_a_few_strong_maps_do_not_wash_out_the_rest():
    largest = [0.03] * 95 + [0.4] * 5  # most maps change p by 0.03 at most, five by 0.4
    assert heatmap_figures.shared_limit(largest) == pytest.approx(0.03 + 0.37 * 0.05, abs=0.02)  # near 0.03, not 0.4
    assert heatmap_figures.shared_limit([0.1, 0.2], quantile=1.0) == pytest.approx(0.2)
    assert heatmap_figures.shared_limit([0.0, 0.0]) > 0 and heatmap_figures.shared_limit([]) > 0


def test_draw_all_puts_each_figure_beside_its_map_on_one_scale_and_counts_what_it_could_not_draw(tmp_path):
    """The driver's pass after scoring: the predictions' rows (as predict writes them) and the actors' .npy maps in;
    a PNG beside each map, every figure on the largest change of any map; an image gone since scoring is counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    inputs, maps, preds = tmp_path / "in", tmp_path / "maps", tmp_path / "preds"
    (inputs / "a").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, size in (("a/one.png", (120, 90)), ("two.png", (200, 150)), ("gone.png", (64, 64))):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(inputs / name)
    grids = {"a/one.png": np.full((8, 8), 0.05, np.float32), "two.png": np.full((8, 8), -0.25, np.float32),
             "gone.png": np.zeros((8, 8), np.float32)}
    for name, grid in grids.items():
        dest = heatmap_figures.heatmap_path(maps, inputs, str(inputs / name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        np.save(f"{dest}.npy", grid)
    (inputs / "gone.png").unlink()  # moved after scoring
    preds.mkdir()
    pq.write_table(pa.table({
        "path": [str(inputs / n) for n in ("a/one.png", "two.png", "gone.png", "broken.jpg")],
        "ok": [True, True, True, False],
        "predicted_class": ["x", "y", "x", None],
        "prob_x": [0.9, 0.3, 0.6, None], "prob_y": [0.1, 0.7, 0.4, None],
    }), preds / "part-0.parquet")
    result = heatmap_figures.draw_all(preds, maps, inputs, ["x", "y"])
    assert result == {"figures": 2, "skipped": 1, "limit": pytest.approx(np.quantile([0.05, 0.25, 0.0], 0.95)), "beyond_scale": 1}
    one, two = Image.open(maps / "a" / "one.png.png"), Image.open(maps / "two.png.png")
    assert one.width == heatmap_figures.MIN_WIDTH and two.width == heatmap_figures.MIN_WIDTH
    assert not (maps / "gone.png.png").exists() and not (maps / "broken.jpg.png").exists()
    # one scale: the map of 0.05 is drawn much fainter than the map of -0.25 (which sits at the scale's end)
    original_two = np.asarray(Image.open(inputs / "two.png"), dtype=np.float32)
    left = (heatmap_figures.MIN_WIDTH - 200) // 2
    shift_two = np.abs(np.asarray(two, dtype=np.float32)[:150, left:left + 200] - original_two).mean()
    original_one = np.asarray(Image.open(inputs / "a" / "one.png"), dtype=np.float32)
    left = (heatmap_figures.MIN_WIDTH - 120) // 2
    shift_one = np.abs(np.asarray(one, dtype=np.float32)[:90, left:left + 120] - original_one).mean()
    assert shift_two > 3 * shift_one > 0
