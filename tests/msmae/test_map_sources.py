"""The map sources: each gives [B, L] weights in [0, 1]; the unfused block recomputation is exact;
occlusion is the probability drop per left-out token; a refresh can use any source."""

from __future__ import annotations

import pytest
import torch

import msmae
from msmae.attention import attention_maps
from msmae.map_sources import MAP_SOURCES, _block_with_probs, _attention_probs, class_logits, occlusion_drops, source_maps


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    preset = msmae.get_preset("tiny", img_size=32, patch_size=8)  # 16 patches
    return msmae.build_pretrain_model(preset, 3).eval(), msmae.build_classifier(preset, 3, drop_path_rate=0.0).eval()


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("source", MAP_SOURCES)
def test_every_source_gives_one_weight_in_0_1_per_patch_for_both_models(models, source):
    for model in models:
        maps = source_maps(model, _images(), source)
        assert maps.shape == (2, 16) and torch.isfinite(maps).all()
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
        assert model.training is False  # the mode is restored


def test_cls_attention_is_the_papers_map(models):
    model = models[0]
    assert torch.equal(source_maps(model, _images(), "cls_attention"), attention_maps(model, _images()))


def test_the_unfused_block_with_its_own_probabilities_is_the_block(models):
    vit = models[0].encoder
    x = msmae.models.embed_tokens(vit, _images())
    block = vit.blocks[0]
    with torch.no_grad():
        assert torch.allclose(_block_with_probs(block, x, _attention_probs(block, x)), block(x), atol=1e-5)


def test_grad_attention_depends_on_the_class_and_leaves_no_gradients(models):
    model = models[1]
    images = _images()
    maps = [source_maps(model, images, "grad_attention", torch.full((2,), c)) for c in range(3)]
    assert not torch.allclose(maps[0], maps[1]) or not torch.allclose(maps[1], maps[2])
    assert all(p.grad is None for p in model.parameters())


def test_occlusion_is_the_drop_of_the_class_probability_without_the_patch(models):
    model = models[1]
    images = _images(1)
    drops, target = occlusion_drops(model, images)
    full = class_logits(model, images).softmax(-1)[0, target[0]]
    kept = torch.tensor([[i for i in range(16) if i != 5]])
    without = class_logits(model, images, kept).softmax(-1)[0, target[0]]
    assert drops[0, 5].item() == pytest.approx((full - without).item(), abs=1e-5)


def test_refresh_uses_the_chosen_source_and_the_batches_labels(models):
    model = models[0]
    images, index, labels = _images(), torch.tensor([4, 7]), torch.tensor([0, 2])
    refreshed = msmae.refresh_maps(model, [(images, index, labels)], source="grad_attention")
    assert torch.equal(refreshed.index, index)
    assert torch.allclose(refreshed.maps, source_maps(model, images, "grad_attention", labels))
    with pytest.raises(ValueError, match="unknown map source"):
        source_maps(model, images, "saliency")
