"""The single-process comparison runner (package ``comparison``): GPU-style augmentation,
bundles, methods, budget.

Runs on CPU by default and on CUDA with MSMAE_TEST_DEVICE=cuda (torch + timm + torchvision only;
fixtures in tests/comparison/conftest.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop

from comparison.augment import CROP_RATIO, CROP_SCALE, TrainBatches, resized_crop, sample_crop_boxes
from comparison.budget import StepTimes, estimate_run, estimate_total, fit_epochs, plan_runs
from comparison.bundle import SPLITS, decode_all, load_bundle, make_bundle, save_bundle
from comparison.pretrain_store import PretrainCache
from comparison.runner import (
    METHODS, Method, Recipe, class_weights, effective_recipe, finetune, load_device_data, pretrain, pretrain_key, pretrained_encoder,
    run_method,
)
from msmae.geometry import crop_flip_maps

ROOT = Path(__file__).resolve().parents[2]


# --- augmentation --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [8, 24])
def test_whole_image_box_without_flip_is_a_plain_resize(device, mode, size):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device) * 255
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3, device=device)
    out = resized_crop(images, boxes, torch.zeros(3, dtype=torch.bool, device=device), size, mode=mode)
    expected = F.interpolate(images, size=(size, size), mode=mode, align_corners=False)
    # 0-255 scale: a misplaced sampling grid would be off by whole grey levels, not hundredths
    torch.testing.assert_close(out, expected, atol=0.05, rtol=1e-4)


def _coordinate_image(h: int, w: int, device) -> torch.Tensor:
    """Channel 0 = normalised x of each pixel centre, channel 1 = normalised y, channel 2 = 0."""
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    return torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.zeros(h, w)]).unsqueeze(0).to(device)


def test_each_output_pixel_shows_the_source_point_its_box_says(device):
    """Bilinear sampling reproduces a linear image exactly: pixel j of the crop must show
    x0 + (j + 0.5) / S · (x1 − x0) of the source (mirrored when flipped)."""
    h, w, size = 24, 32, 16
    source = _coordinate_image(h, w, device).expand(6, -1, -1, -1)
    gen = torch.Generator(device=device).manual_seed(3)
    boxes = sample_crop_boxes(torch.full((6,), w / h, device=device), gen)
    flipped = torch.tensor([False, True] * 3, device=device)
    out = resized_crop(source, boxes, flipped, size, mode="bilinear")
    t = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    for b in range(6):
        x0, y0, x1, y1 = boxes[b].tolist()
        ex = x0 + t * (x1 - x0)
        ex = ex.flip(0) if flipped[b] else ex
        ey = y0 + t * (y1 - y0)
        # border padding clamps at the outermost pixel centres
        ex, ey = ex.clamp(0.5 / w, 1 - 0.5 / w), ey.clamp(0.5 / h, 1 - 0.5 / h)
        # half a source pixel would be 1/64 here
        torch.testing.assert_close(out[b, 0], ex.expand(size, size), atol=1e-3, rtol=0)
        torch.testing.assert_close(out[b, 1], ey[:, None].expand(size, size), atol=1e-3, rtol=0)


def test_augmented_patches_match_the_maps_moved_by_geometry(device):
    """The crop box the augmentation emits moves a patch map exactly as the image moved:
    per-patch means of the augmented image == crop_flip_maps of the source's per-patch means."""
    patch, grid = 8, 4
    gen = torch.Generator().manual_seed(1)
    values = torch.rand(2, grid, grid, generator=gen)
    source = values.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).expand(-1, 3, -1, -1).to(device)
    # patch-aligned boxes: 2x2 source patches -> a 4x4 output grid (each output patch = half a source patch)
    boxes = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.5, 0.5, 1.0]], device=device)
    flipped = torch.tensor([False, True], device=device)
    out = resized_crop(source, boxes, flipped, patch * grid, mode="nearest")
    out_means = F.avg_pool2d(out[:, :1], patch).flatten(1)
    moved = crop_flip_maps(values.flatten(1).to(device), (grid, grid), boxes, flipped)
    torch.testing.assert_close(out_means, moved, atol=1e-5, rtol=0)
    # and the moved map is not the unmoved one (the test could tell them apart)
    assert not torch.allclose(moved, values.flatten(1).to(device), atol=1e-3)


@pytest.mark.parametrize("aspect", [1.0, 4 / 3, 0.6])
def test_crop_boxes_follow_random_resized_crop(device, aspect):
    gen = torch.Generator(device=device).manual_seed(0)
    boxes = sample_crop_boxes(torch.full((4000,), aspect, device=device), gen).cpu()
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + 1e-6).all() and (y1 <= 1 + 1e-6).all()
    area, pixel_ratio = w * h, w / h * aspect
    assert area.min() >= CROP_SCALE[0] - 1e-5 and area.max() <= CROP_SCALE[1] + 1e-5
    assert pixel_ratio.min() >= CROP_RATIO[0] - 1e-4 and pixel_ratio.max() <= CROP_RATIO[1] + 1e-4
    # same distribution as torchvision's own sampler on an image of this aspect (area and width)
    torch.manual_seed(0)
    reference = torch.empty(1, 300, round(300 * aspect))
    tv = torch.tensor([RandomResizedCrop.get_params(reference, list(CROP_SCALE), list(CROP_RATIO))[2:] for _ in range(2000)], dtype=torch.float32)
    tv_w, tv_h = tv[:, 1] / reference.shape[2], tv[:, 0] / reference.shape[1]
    assert abs(float(area.mean()) - float((tv_w * tv_h).mean())) < 0.02
    assert abs(float(w.mean()) - float(tv_w.mean())) < 0.02
    assert x0.std() > 0.05 and y0.std() > 0.05  # positions vary
    again = sample_crop_boxes(torch.full((4000,), aspect, device=device), torch.Generator(device=device).manual_seed(0)).cpu()
    torch.testing.assert_close(boxes, again)


def test_crop_boxes_fall_back_to_a_centred_crop_for_extreme_aspects(device):
    boxes = sample_crop_boxes(torch.tensor([10.0], device=device), torch.Generator(device=device).manual_seed(0)).cpu()[0]
    w = CROP_RATIO[1] / 10.0  # widest allowed pixel ratio over the full height
    torch.testing.assert_close(boxes, torch.tensor([(1 - w) / 2, 0.0, (1 + w) / 2, 1.0]), atol=1e-6, rtol=0)


def test_train_batches_cover_each_image_once_per_pass(device):
    n, bs = 37, 8
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, device=device)
    labels = torch.arange(n, device=device) % 3
    batches = TrainBatches(images, labels, torch.ones(n), 8, bs, torch.Generator(device=device).manual_seed(0))
    assert len(batches) == n // bs
    seen = []
    for b in batches:
        assert set(b) == {"image", "label", "index", "crop_box", "flipped"}
        assert b["image"].shape == (bs, 3, 8, 8) and b["image"].dtype == torch.float32
        assert b["crop_box"].shape == (bs, 4) and b["flipped"].dtype == torch.bool
        assert torch.equal(b["label"], labels[b["index"]])
        assert -3 < float(b["image"].min()) and float(b["image"].max()) < 3  # ImageNet-normalised
        seen.append(b["index"].cpu())
    seen = torch.cat(seen)
    assert len(seen) == (n // bs) * bs and len(set(seen.tolist())) == len(seen)
    second = torch.cat([b["index"].cpu() for b in batches])
    assert not torch.equal(seen, second)  # a fresh order each pass


# --- bundles -------------------------------------------------------------------------------


def _synthetic_bundle(n_per_split=(48, 16, 16), side=32, classes=("a", "b", "c")):
    """Class k: a bright block in a class-specific place on a dark, slightly noisy image."""
    gen = torch.Generator().manual_seed(0)
    images, labels, splits = [], [], []
    for split, n in zip(SPLITS, n_per_split, strict=True):
        for i in range(n):
            label = i % len(classes)
            img = (torch.rand(3, side, side, generator=gen) * 40).to(torch.uint8)
            q = side // 4
            img[:, q * label: q * label + q, q: 3 * q] = 220
            images.append(img)
            labels.append(label)
            splits.append(split)
    aspect = [1.0 + 0.5 * (i % 2) for i in range(len(images))]
    return make_bundle("synthetic", list(classes), images, labels, splits, aspect=aspect), images


def test_bundle_round_trips(tmp_path):
    bundle, images = _synthetic_bundle()
    path = save_bundle(bundle, tmp_path / "b.pt")
    loaded = load_bundle(path)
    assert loaded.name == "synthetic" and loaded.classes == ["a", "b", "c"] and loaded.side == 32
    assert len(loaded) == 80 and loaded.counts() == {"train": 48, "val": 16, "test": 16}
    for key in ("label", "split", "index", "aspect", "offsets", "jpeg"):
        assert torch.equal(getattr(loaded, key), getattr(bundle, key)), key
    decoded = decode_all(loaded)
    assert decoded.shape == (80, 3, 32, 32) and decoded.dtype == torch.uint8
    error = (decoded.float() - torch.stack(images).float()).abs().mean()
    assert error < 10, f"JPEG round trip too lossy: mean abs error {error:.1f}"
    # every decoded image is the one stored at its position: its bright block is where its label puts it
    rows = decoded[:, 0, :, 8:24].float().mean(dim=2).reshape(80, 4, 8).mean(dim=2)  # brightness per quarter
    assert torch.equal(rows.argmax(dim=1), loaded.label)


def test_bundle_rejects_mismatched_images():
    img = torch.zeros(3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        make_bundle("x", ["a"], [img, torch.zeros(3, 9, 9, dtype=torch.uint8)], [0, 0], ["train", "val"])
    with pytest.raises(ValueError, match="unknown split"):
        make_bundle("x", ["a"], [img], [0], ["holdout"])


# --- methods end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    bundle, _ = _synthetic_bundle()
    path = save_bundle(bundle, tmp_path_factory.mktemp("bundle") / "synthetic.pt")
    return path


def _tiny_recipe(**kw) -> Recipe:
    return Recipe.for_epochs(2, 1, preset="tiny", img_size=32, patch_size=8, batch_size=16, eval_batch_size=32,
                             sam_start=1, refresh_every=1, finetune_refresh_every=1, **kw)


@pytest.fixture(scope="module")
def every_method(tiny_data, device):
    """Every method once on the synthetic bundle (seed 0), with the progress rows they printed."""
    torch.manual_seed(0)
    data = load_device_data(load_bundle(tiny_data), 32, device)
    rows: list[dict] = []
    cache = PretrainCache()
    records = {name: run_method(name, _tiny_recipe(), data, 0, device, progress=rows.append, cache=cache) for name in METHODS}
    return records, rows, data


def test_every_method_trains_selects_and_tests(every_method):
    records, rows, data = every_method
    recipe = _tiny_recipe()
    for name, r in records.items():
        json.dumps(r)  # a JSON line as written
        for split in ("val", "test"):
            for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
                assert 0.0 <= r[split][metric] <= 1.0, (name, split, metric)
        assert sum(map(sum, r["test_confusion"])) == 16
        assert 0 <= r["selected_epoch"] < r["finetune_epochs"]
        assert r["val"]["macro_f1"] == max(row["val_macro_f1"] for row in r["finetune_curve"])
        assert r["image_passes"] == (3 if name != "supervised_eqflops" else r["finetune_epochs"])
        assert r["wall_seconds"] > 0
        # per-image predictions of the selected state, and the FLOPs of every training image seen
        assert len(r["predictions"]["test_pred"]) == 16 == len(r["predictions"]["test_label"])
        assert r["predictions"]["val_label"] == data.val_labels.tolist() and len(r["predictions"]["val_pred"]) == 16
        correct = sum(p == y for p, y in zip(r["predictions"]["test_pred"], r["predictions"]["test_label"]))
        assert correct / 16 == pytest.approx(r["test"]["accuracy"])
        assert r["train_flops"] == r["flops"]["train"] > 0 and r["flops"]["eval"] > 0
    assert records["supervised"]["pretrain_curve"] == [] and records["supervised"]["finetune_epochs"] == 3
    assert [row["phase"] for row in records["mae"]["pretrain_curve"]] == ["random", "random"]
    assert [row["phase"] for row in records["msmae"]["pretrain_curve"]] == ["random", "sam"]
    assert records["mae"]["recipe"]["cls_weight"] == 0.1  # the recipe's; MAE itself trains with 0:
    assert records["mae"]["pretrain_curve"][0]["train_loss"] == pytest.approx(records["mae"]["pretrain_curve"][0]["train_loss_recon"], rel=1e-5)
    assert records["msmae"]["pretrain_curve"][1]["maps_refreshed"]
    assert [row["phase"] for row in records["msmae"]["finetune_curve"]] == ["sam"]
    assert [row["phase"] for row in records["msmae_ft_all"]["finetune_curve"]] == ["random"]
    assert records["msmae_ft_all"]["pretrain_shared"] and not records["msmae"]["pretrain_shared"]
    assert records["msmae_frozen_maps"]["pretrain_shared"]
    assert not records["msmae_released"]["pretrain_shared"]  # uniform weights in pre-training: its own pre-training
    assert not records["msmae_uniform_ft_all"]["pretrain_shared"] and not records["mae_cls"]["pretrain_shared"]
    # each method on its own recipe: MAE on MAE's settings but the shared lr, the supervised ViT without layer decay
    assert records["mae"]["recipe"]["pretrain_blr"] == recipe.pretrain_blr and records["mae"]["recipe"]["norm_pix_loss"]
    assert records["msmae"]["recipe"]["pretrain_blr"] == recipe.pretrain_blr and not records["msmae"]["recipe"]["norm_pix_loss"]
    assert records["supervised"]["recipe"]["layer_decay"] == 1.0 != recipe.layer_decay == records["msmae"]["recipe"]["layer_decay"]
    assert records["msmae"]["sam_started_epoch"] == 1 and records["mae"]["sam_started_epoch"] is None
    # every MSMAE pre-training epoch says how well the CLS head (whose maps SAM follows) classifies
    assert all(0.0 <= row["val_cls_balanced_accuracy"] <= 1.0 for row in records["msmae"]["pretrain_curve"])
    assert all("val_cls_balanced_accuracy" not in row for row in records["mae"]["pretrain_curve"])
    # the controls: mae_cls masks at random throughout with the CLS term; the uniform rule keeps the CLS term
    assert [row["phase"] for row in records["mae_cls"]["pretrain_curve"]] == ["random", "random"]
    assert all(row["train_loss"] > row["train_loss_recon"] + 1e-3 and "val_cls_balanced_accuracy" in row
               for row in records["mae_cls"]["pretrain_curve"])
    assert [row["phase"] for row in records["msmae_uniform_ft_all"]["pretrain_curve"]] == ["random", "sam"]
    assert [row["phase"] for row in records["msmae_uniform_ft_all"]["finetune_curve"]] == ["random"]
    assert not records["msmae_uniform_ft_all"]["pretrain_curve"][1]["maps_refreshed"]  # the uniform rule needs no maps
    # the released code's CLS term (softmax, then cross-entropy on 3 classes) can never fall below log(e + 2) - 1
    assert all(row["train_loss_cls"] > math.log(math.e + 2) - 1 for row in records["msmae_released"]["pretrain_curve"])
    # frozen maps: SAM fine-tuning with no refresh at all
    assert [(row["phase"], row["maps_refreshed"]) for row in records["msmae_frozen_maps"]["finetune_curve"]] == [("sam", False)]
    assert records["msmae"]["finetune_curve"][0]["maps_refreshed"]
    # the equal-FLOPs row trains as many all-token epochs as msmae_ft_all's two stages cost, the CNN the supervised ViT's
    flops = records["msmae_ft_all"]["step_flops_per_image"]
    expected = (flops["pretrain_random"] + flops["pretrain_sam"] + flops["finetune_all"]) / flops["finetune_all"]
    assert records["supervised_eqflops"]["finetune_epochs"] == round(expected) < 3
    assert records["supervised_eqflops"]["train_flops"] == pytest.approx(round(expected) * 48 * flops["finetune_all"])
    assert records["resnet18"]["finetune_epochs"] == 3 and records["resnet18"]["train_flops"] == pytest.approx(3 * 48 * flops["cnn"])
    assert records["msmae_ft_all"]["train_flops"] == pytest.approx(48 * sum(flops[k] for k in ("pretrain_random", "pretrain_sam", "finetune_all")))
    assert len(rows) == sum(len(r["pretrain_curve"]) * (not r["pretrain_shared"]) + len(r["finetune_curve"]) for r in records.values())


def test_sam_waits_for_the_cls_head_then_starts_at_the_latest_epoch(tiny_data):
    """A gate no head can reach (1.0 on noise) holds SAM back until sam_latest; a gate any head
    passes (tiny) lets it start at sam_start."""
    data = load_device_data(load_bundle(tiny_data), 32, "cpu")
    recipe = Recipe.for_epochs(4, 1, preset="tiny", img_size=32, patch_size=8, batch_size=16, eval_batch_size=32,
                               sam_start=1, sam_latest=3, refresh_every=1)

    def phases(gate: float) -> list[str]:
        _, result = pretrain(METHODS["msmae"], replace(recipe, sam_gate=gate), data, 0, torch.device("cpu"))
        return [row["phase"] for row in result.curve]

    assert phases(1.0) == ["random", "random", "random", "sam"]
    assert phases(1e-6) == ["random", "sam", "sam", "sam"]
    with pytest.raises(ValueError, match="sam_gate"):
        replace(recipe, sam_gate=1.5)


def test_class_balance_weights_the_loss_by_inverse_frequency(tiny_data):
    full = load_device_data(load_bundle(tiny_data), 32, "cpu")
    keep = torch.cat([torch.nonzero(full.train_labels != 2).flatten(), torch.nonzero(full.train_labels == 2).flatten()[:4]])
    data = replace(full, train=full.train[keep], train_plain=full.train_plain[keep], train_labels=full.train_labels[keep],
                   train_aspect=full.train_aspect[keep])  # 16 / 16 / 4 images
    recipe = _tiny_recipe()
    assert class_weights(recipe, data) is None
    weights = class_weights(replace(recipe, class_balance=True), data)
    counts = torch.bincount(data.train_labels, minlength=data.num_classes).float()
    assert torch.allclose(weights * counts, torch.full_like(counts, counts.sum() / data.num_classes))
    balanced = run_method("supervised", replace(recipe, class_balance=True), data, 0, "cpu")
    plain = run_method("supervised", recipe, data, 0, "cpu")
    assert balanced["recipe"]["class_balance"] and not plain["recipe"]["class_balance"]
    # same seed, same data and order: only the loss weights differ, and they change training
    assert balanced["finetune_curve"][0]["train_loss"] != pytest.approx(plain["finetune_curve"][0]["train_loss"], rel=1e-6)


def test_a_seed_repeats_on_cpu(tiny_data):
    data = load_device_data(load_bundle(tiny_data), 32, "cpu")

    def loss(seed: int) -> float:
        _, result = pretrain(METHODS["msmae"], _tiny_recipe(), data, seed, torch.device("cpu"))
        return result.curve[1]["train_loss"]  # the SAM epoch: init, crops, masks and maps all seeded

    first = loss(1)
    assert loss(1) == pytest.approx(first, rel=1e-4)
    assert loss(2) != pytest.approx(first, rel=1e-4)


# --- budget --------------------------------------------------------------------------------

_TIMES = StepTimes(pretrain_random=0.02, pretrain_sam=0.015, finetune_all=0.03, finetune_sam=0.012, eval_image=2e-5, setup=0.5)
_COUNTS = {"train": 4000, "val": 850, "test": 850}


def test_runs_are_seed_major_and_msmae_pretraining_is_shared_once_per_seed():
    methods = list(METHODS.values())
    order = plan_runs(methods, [0, 1])
    assert [(s, m.name) for s, m, _ in order][:len(methods)] == [(0, m.name) for m in methods]
    assert [m.name for s, m, shared in order if shared] == ["msmae_frozen_maps", "msmae_ft_all"] * 2


def test_estimates_grow_with_epochs_and_fit_the_budget():
    methods = list(METHODS.values())
    recipe = Recipe.for_epochs(20, 20)
    short = Recipe.for_epochs(10, 10)
    assert estimate_total(methods, [0], recipe, _COUNTS, _TIMES) > estimate_total(methods, [0], short, _COUNTS, _TIMES)
    sam = estimate_run(METHODS["msmae"], recipe, _COUNTS, _TIMES)
    all_tokens = estimate_run(METHODS["msmae_ft_all"], recipe, _COUNTS, _TIMES)
    assert sam < all_tokens  # SAM fine-tuning steps are cheaper here
    assert estimate_run(METHODS["msmae_ft_all"], recipe, _COUNTS, _TIMES, pretrain_shared=True) < all_tokens
    full = estimate_total(methods, [0, 1, 2], recipe, _COUNTS, _TIMES)
    fitted, total = fit_epochs(recipe, methods, [0, 1, 2], _COUNTS, _TIMES, budget_seconds=full / 2,
                               rescale=lambda e1, e2: Recipe.for_epochs(e1, e2))
    assert total * 1.15 <= full / 2 and fitted.pretrain_epochs < 20 and fitted.finetune_epochs < 20
    assert fitted.sam_start == max(1, round(0.3 * fitted.pretrain_epochs))  # schedule rescaled with the epochs
    same, _ = fit_epochs(recipe, methods, [0], _COUNTS, _TIMES, budget_seconds=1e9)
    assert (same.pretrain_epochs, same.finetune_epochs) == (20, 20)  # never scaled up


def test_recipe_for_epochs_keeps_explicit_overrides():
    r = Recipe.for_epochs(10, 10, sam_start=5)
    assert r.sam_start == 5 and r.refresh_every == 2 and r.finetune_warmup == 1.0
    assert replace(r, pretrain_epochs=4).supervised_epochs() == 14


# --- the package stays Ray- and MLflow-free ------------------------------------------------


def test_runner_imports_no_pipeline_stack():
    code = ("import sys; import comparison.runner, comparison.budget, comparison.bundle, comparison.augment; "
            "bad = {'ray', 'mlflow', 'pyarrow', 'pydantic', 'polars'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- learning rates, frozen maps, resumable pre-training ------------------------------------


def test_the_grid_learning_rate_goes_to_each_methods_tuned_stage():
    recipe = _tiny_recipe()
    mae = effective_recipe(METHODS["mae"], recipe, 4e-3)
    assert (mae.pretrain_blr, mae.finetune_blr, mae.norm_pix_loss) == (4e-3, recipe.finetune_blr, True)
    sup = effective_recipe(METHODS["supervised"], recipe, 4e-3)
    assert (sup.pretrain_blr, sup.finetune_blr, sup.layer_decay) == (recipe.pretrain_blr, 4e-3, 1.0)
    assert effective_recipe(METHODS["msmae"], recipe) == recipe
    with pytest.raises(ValueError, match="frozen maps"):
        Method("bad", "mae", "attention", frozen_maps=True)


def test_frozen_maps_are_the_pretrained_models_and_are_required(tiny_data):
    data = load_device_data(load_bundle(tiny_data), 32, "cpu")
    _, result = pretrain(METHODS["msmae"], _tiny_recipe(), data, 0, torch.device("cpu"))
    assert result.maps.shape == (48, 16) and not torch.allclose(result.maps, torch.ones_like(result.maps))
    with pytest.raises(ValueError, match="maps"):
        finetune(METHODS["msmae_frozen_maps"], _tiny_recipe(), data, 0, torch.device("cpu"), None, 1, 1.0)


def test_an_interrupted_pretraining_resumes_where_it_stopped(tiny_data, tmp_path):
    """Killed after 2 of 4 epochs (checkpoint every epoch), then run again: the same curve and
    weights as an uninterrupted run; snapshots after 2 and 4 epochs are kept to fine-tune from."""
    data = load_device_data(load_bundle(tiny_data), 32, "cpu")
    recipe = replace(_tiny_recipe(), pretrain_epochs=4, sam_start=1, refresh_every=2)
    method, cpu = METHODS["msmae"], torch.device("cpu")
    reference, whole = pretrain(method, recipe, data, 0, cpu)

    class Stop(Exception):
        pass

    def stop_after_two(row: dict) -> None:
        if row["epoch"] == 1:
            raise Stop

    cache = PretrainCache(directory=tmp_path, checkpoint_every=1, snapshots=(2, 4))
    with pytest.raises(Stop):
        pretrained_encoder(method, recipe, data, 0, cpu, stop_after_two, cache)
    key = pretrain_key(method, recipe, data, 0)
    latest = cache.checkpointing(key).latest
    assert torch.load(latest, weights_only=True)["epochs_done"] == 2 and not cache.path(key).exists()
    resumed_rows: list[dict] = []
    fresh = PretrainCache(directory=tmp_path, checkpoint_every=1, snapshots=(2, 4))  # a new process: nothing in memory
    state, result, found = pretrained_encoder(method, recipe, data, 0, cpu, resumed_rows.append, fresh)
    assert not found and [row["epoch"] for row in resumed_rows] == [2, 3]  # only the epochs left
    assert [row["phase"] for row in result.curve] == [row["phase"] for row in whole.curve]
    for got, want in zip(result.curve, whole.curve, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(state[name], value, atol=1e-4, rtol=1e-4)
    assert cache.path(key).exists() and not latest.exists()  # finished: the training state is gone, the result kept
    early, early_result = fresh.snapshot(key, 2)
    assert len(early_result.curve) == 2 and set(early) == set(state)
    assert any(not torch.equal(early[k], state[k]) for k in state)  # two more epochs moved the weights
    with pytest.raises(FileNotFoundError, match="snapshot"):
        fresh.snapshot(key, 3)


def test_fine_tuning_from_snapshots_records_the_pretraining_length(tiny_data, tmp_path):
    data = load_device_data(load_bundle(tiny_data), 32, "cpu")
    recipe = replace(_tiny_recipe(), pretrain_epochs=3)
    cache = PretrainCache(directory=tmp_path, snapshots=(1, 3))
    early = run_method("msmae_ft_all", recipe, data, 0, "cpu", cache=cache, from_snapshot=1)
    late = run_method("msmae_ft_all", recipe, data, 0, "cpu", cache=cache, from_snapshot=3)
    assert (early["pretrain_checkpoint_epoch"], early["pretrain_epochs"], len(early["pretrain_curve"])) == (1, 1, 1)
    assert (late["pretrain_checkpoint_epoch"], late["pretrain_epochs"]) == (3, 3) and late["pretrain_shared"]
    assert early["train_flops"] < late["train_flops"]
