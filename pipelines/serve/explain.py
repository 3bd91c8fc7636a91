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
ViT, 196 at 224 px), batched; opt-in (``msmae predict --heatmaps``, the served model's
``heatmaps`` parameter).

The same token dropping hides patches for the faithfulness check (``probability_without``):
hiding the map's top patches must cost the prediction more than hiding random ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import msmae
from msmae import map_sources


def class_probability(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` probabilities of the model at ``temperature`` on all tokens, or on ``kept`` ``[B, n]`` patches only."""
    model.eval()
    return map_sources.class_probability(model, pixels, temperature, kept)


def occlusion_maps(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                   target: torch.Tensor | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] drop of the target class's probability per left-out patch, [B] target class)``, on the CPU.

    The pure-torch core is ``msmae.map_sources.occlusion_drops``, which SAM can also use as a
    map source (``*.masking.map_source: occlusion``)."""
    model.eval()
    return map_sources.occlusion_drops(model, pixels, temperature, target, chunk)


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


def save_heatmap(path: Path, rgb: np.ndarray, grid: np.ndarray, title: str) -> None:
    """One image with its occlusion map over it (red: evidence for the predicted class, blue: against)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    limit = float(np.abs(grid).max()) or 1e-6
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    axes[0].imshow(rgb)
    axes[1].imshow(rgb)
    shown = axes[1].imshow(grid, cmap="bwr", alpha=0.55, vmin=-limit, vmax=limit, extent=(0, rgb.shape[1], rgb.shape[0], 0),
                           interpolation="nearest")
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02, label="probability drop without the patch")
    fig.suptitle(title, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
