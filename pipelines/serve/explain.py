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


@torch.no_grad()
def class_probability(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` probabilities of the model at ``temperature`` on all tokens, or on ``kept`` ``[B, n]`` patches only."""

    model.eval()
    with msmae.autocast(pixels.device):  # bf16 on a CUDA GPU, as msmae.predict_probs; plain fp32 on CPU
        logits = model(pixels.float(), kept)
    return (logits.float() / temperature).softmax(-1)


@torch.no_grad()
def occlusion_maps(model: msmae.MSMAEClassifier, pixels: torch.Tensor, temperature: float = 1.0,
                   target: torch.Tensor | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] drop of the target class's probability per left-out patch, [B] target class)``.

    ``target`` defaults to each image's predicted class. ``chunk`` bounds how many occluded
    sequences run at once (memory)."""
    model.eval()
    n, num_patches = len(pixels), model.preset.num_patches
    full = class_probability(model, pixels, temperature)
    target = full.argmax(-1) if target is None else target.long()
    base = full.gather(1, target[:, None])[:, 0]  # [B]
    # Row i of `leave_one_out` keeps every patch but i.
    everything = torch.arange(num_patches)
    leave_one_out = torch.stack([torch.cat([everything[:i], everything[i + 1:]]) for i in range(num_patches)])  # [L, L-1]
    rows = torch.arange(n).repeat_interleave(num_patches)  # (image, left-out patch) pairs, image-major
    cols = torch.arange(num_patches).repeat(n)
    drops = torch.empty(n * num_patches)
    for start in range(0, len(rows), chunk):
        b, i = rows[start:start + chunk], cols[start:start + chunk]
        probs = class_probability(model, pixels[b], temperature, leave_one_out[i])
        drops[start:start + chunk] = base[b] - probs.gather(1, target[b][:, None])[:, 0]
    drops = drops.reshape(n, num_patches)
    return drops, target


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
