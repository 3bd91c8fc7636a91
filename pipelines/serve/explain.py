"""Per-prediction explanation: which patches drove *this* prediction of *this* classifier.

Method: patch-token occlusion. For an image predicted as class c with probability p, the map's
value at patch i is ``p - p_without_i``, the drop in the (calibrated) probability of c when
patch i's token is left out of the sequence; positive patches are evidence for c, negative ones
against it.

Why this and not the alternatives:
- CLS attention (the run's attention overlays) is not it: the classifier mean-pools the patch
  tokens after the last block and the head never reads CLS, so CLS attention describes a
  token the prediction does not use.
- Attention rollout assumes attention flows linearly through residual streams, again towards
  CLS; gradient x input is a first-order local approximation, noisy for ViTs and blind to
  saturation.
- Occlusion measures the prediction itself. Leaving a token out, rather than greying its
  pixels, is how this model was trained to see images (SAM fine-tuning drops tokens, every
  kept token carries its own position embedding, ``MSMAEClassifier.forward(images, kept)``),
  so the occluded input stays in the distribution the model knows and the drop is due to the
  patch's content, not to an artificial grey square.
Cost: L forward passes of L - 1 tokens per image (L = patches: 64 for the demo's 64 px tiny
ViT, 196 at 224 px), the sequences of several images stacked per forward batch up to a memory
cap; opt-in (``msmae predict --heatmaps``, the served model's ``heatmaps`` parameter). The
figures a user reads are drawn by ``pipelines.serve.heatmap_figures``.

The same token dropping hides patches for the faithfulness check (``probability_without``):
hiding the map's top patches must cost the prediction more than hiding random ones.
"""

from __future__ import annotations

import numpy as np
import torch

import msmae
from msmae import map_sources


def class_probability(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` probabilities of the model at ``temperature`` on all tokens, or on ``kept`` ``[B, n]`` patches only."""
    model.eval()
    return map_sources.class_probability(model, pixels, temperature, kept)


# What one occluded forward batch may hold in its largest activation (a block's MLP hidden layer,
# float32). Tens of MiB: large enough that the matrix products run at full speed, small enough to
# stay near the CPU's caches and far below a GPU's memory. See ``occlusion_batch``.
OCCLUSION_BATCH_BYTES = 32 << 20


def occlusion_batch(preset: msmae.ViTPreset, max_bytes: int = OCCLUSION_BATCH_BYTES) -> int:
    """Occluded sequences per forward pass under ``max_bytes`` (at least 1): each holds L - 1 + prefix tokens
    of ``mlp_ratio * embed_dim`` floats in its MLP."""
    tokens = preset.num_patches - 1 + preset.num_prefix_tokens
    per_sequence = tokens * int(preset.mlp_ratio * preset.embed_dim) * 4
    return max(1, max_bytes // per_sequence)


def occlusion_maps(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                   target: torch.Tensor | None = None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] drop of the target class's probability per left-out patch, [B] target class)``, on the CPU.

    All B x L occluded sequences (image-major) run through the model in forward batches of
    ``chunk`` sequences, by default as many as ``occlusion_batch`` allows: several images per
    forward pass. Each sequence's result does not depend on its batch-mates, so the maps equal
    those of one image at a time (``tests/pipelines/serve/test_explain.py``). The pure-torch core
    is ``msmae.map_sources.occlusion_drops``, which SAM can also use as a map source
    (``*.masking.map_source: occlusion``)."""
    model.eval()
    with torch.no_grad():
        return map_sources.occlusion_drops(model, pixels, temperature, target, chunk or occlusion_batch(model.preset))


@torch.no_grad()
def probability_without(model: msmae.MSMAEClassifier, pixels: torch.Tensor, hidden: torch.Tensor, target: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """``[B]`` probability of ``target`` with the patches ``hidden`` ``[B, k]`` left out of each image."""
    num_patches = model.preset.num_patches
    keep = torch.ones(len(pixels), num_patches, dtype=torch.bool)
    keep[torch.arange(len(pixels))[:, None], hidden.long()] = False
    kept = torch.stack([row.nonzero()[:, 0] for row in keep])  # [B, L - k], same k for every image
    return class_probability(model, pixels, temperature, kept).gather(1, target.long()[:, None])[:, 0]


def as_grid(maps: torch.Tensor | np.ndarray, preset: msmae.ViTPreset) -> np.ndarray:
    """``[B, L]`` -> ``[B, gh, gw]`` (patch rows top to bottom)."""
    return np.asarray(maps, dtype=np.float32).reshape(-1, *preset.grid)
