"""Where a map comes from: four ways to turn a model and an image into one weight per patch.

SAM needs a weight per patch that says "this is where the class evidence is". The paper
takes the last block's CLS attention; whether that localises the lesion is exactly what is
in doubt (``msmae.lesion_metrics`` measures it), so the source is a choice
(``*.masking.map_source``):

- ``cls_attention`` — the paper: last block, CLS query, heads min-max normalised and
  averaged (``msmae.attention``). One forward pass.
- ``rollout`` — attention rollout (Abnar & Zuidema 2020): each block's head-averaged
  attention with the residual added (0.5·A + 0.5·I, rows renormalised), multiplied through
  all blocks; the CLS row. One forward pass that materialises every block's attention.
- ``grad_attention`` — class-specific attention relevance (Chefer et al. 2021, "Generic
  attention-model explainability"): R = I, then per block R += mean_heads((∇A ⊙ A)⁺) · R, with
  ∇A the gradient of the target class's logit (the true class when labels are given, else
  the predicted one); the CLS row. One forward and one backward pass.
- ``occlusion`` — the drop in the target class's probability when the patch's token is
  left out (``occlusion_drops``, what ``msmae predict --heatmaps`` shows): faithful to the
  prediction but L extra forward passes of L - 1 tokens per image, so a refresh costs about
  L times a ``cls_attention`` refresh (64x at 64 px / 8 px patches, 196x at 224 / 16).

Every source returns ``[B, L]`` weights in [0, 1] (min-max per image; occlusion's
negative drops, patches that argue against the class, become 0), as SAM's draw expects.
Pre-training models classify with their CLS head, classifiers with their mean-pooled head;
both are handled (``class_logits``). Pure torch + timm.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from timm.models.vision_transformer import VisionTransformer

from msmae.attention import attention_maps, encoder_of
from msmae.models import MSMAEPretrainModel, embed_tokens, encode
from msmae.precision import autocast

MapSource = Literal["cls_attention", "rollout", "grad_attention", "occlusion"]
MAP_SOURCES: tuple[str, ...] = get_args(MapSource)


def class_logits(model: torch.nn.Module, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` logits of the model's own classifier on all tokens, or on ``kept`` ``[B, n]`` patches only:
    the CLS head of a pre-training model, the mean-pooled head of a classifier."""
    if isinstance(model, MSMAEPretrainModel):
        return model.encoder.forward_head(encode(model.encoder, images, kept))
    return model(images, kept)


def _attention_probs(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, N]`` attention probabilities of ``block`` on tokens ``x`` (timm's own modules, unfused)."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q.float() * attn.scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)


def _block_with_probs(block: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``block(x)`` computed from the given attention probabilities (so gradients reach them)."""
    attn = block.attn
    h = block.norm1(x)
    batch, tokens, _ = h.shape
    gate = attn.gate(h).sigmoid() if getattr(attn, "gate", None) is not None else None
    v = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, tokens, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    low = maps.amin(dim=1, keepdim=True)
    span = maps.amax(dim=1, keepdim=True) - low
    return (maps - low) / span.clamp_min(1e-12)


def _patch_row(relevance: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """CLS row of a ``[B, N, N]`` token-to-token matrix, patch columns only, min-max per image: ``[B, L]``."""
    return _minmax(relevance[:, 0, vit.num_prefix_tokens:].float())


@torch.no_grad()
def rollout_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout from the CLS token to the patches, ``[B, L]`` in [0, 1]."""
    vit = encoder_of(model)
    x = embed_tokens(vit, images)
    tokens = x.shape[1]
    eye = torch.eye(tokens, device=x.device)
    rollout = eye.expand(x.shape[0], -1, -1)
    for block in vit.blocks:
        a = 0.5 * _attention_probs(block, x).mean(dim=1) + 0.5 * eye
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
        x = block(x)
    return _patch_row(rollout, vit)


def grad_attention_maps(model: torch.nn.Module, images: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient-weighted attention relevance for the ``target`` class (default: predicted), ``[B, L]`` in [0, 1]."""
    vit = encoder_of(model)
    with torch.enable_grad():
        x = embed_tokens(vit, images.detach())
        probs = []
        for block in vit.blocks:
            p = _attention_probs(block, x)
            probs.append(p)
            x = _block_with_probs(block, x, p)
        logits = vit.forward_head(vit.norm(x))
        target = logits.argmax(-1) if target is None else target.long().to(logits.device)
        # autograd.grad, not backward: the model's parameters get no .grad from a refresh
        grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), probs)
    with torch.no_grad():
        tokens = x.shape[1]
        relevance = torch.eye(tokens, device=x.device).expand(x.shape[0], -1, -1).clone()
        for p, g in zip(probs, grads, strict=True):
            cam = (g * p).clamp_min(0).mean(dim=1)  # [B, N, N]
            relevance = relevance + cam @ relevance
        return _patch_row(relevance, vit)


@torch.no_grad()
def class_probability(model: torch.nn.Module, images: torch.Tensor, temperature: float = 1.0,
                      kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, C]`` probabilities at ``temperature`` on all tokens, or on ``kept`` ``[B, n]`` patches only."""
    with autocast(images.device):  # bf16 on a CUDA GPU, plain fp32 on CPU
        logits = class_logits(model, images.float(), kept)
    return (logits.float() / temperature).softmax(-1)


@torch.no_grad()
def occlusion_drops(model: torch.nn.Module, images: torch.Tensor, temperature: float = 1.0,
                    target: torch.Tensor | None = None, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``([B, L] drop of the target class's probability per left-out patch, [B] target class)``.

    ``target`` defaults to each image's predicted class. ``chunk`` bounds how many occluded
    sequences run at once (memory). Leaving a token out, rather than greying its pixels, is
    how SAM-trained models see partial images, so the occluded input stays in distribution."""
    n = len(images)
    num_patches = encoder_of(model).patch_embed.num_patches
    full = class_probability(model, images, temperature)
    target = full.argmax(-1) if target is None else target.long().to(full.device)
    base = full.gather(1, target[:, None])[:, 0]  # [B]
    everything = torch.arange(num_patches, device=images.device)
    # Row i of `leave_one_out` keeps every patch but i.
    leave_one_out = torch.stack([torch.cat([everything[:i], everything[i + 1:]]) for i in range(num_patches)])  # [L, L-1]
    rows = torch.arange(n, device=images.device).repeat_interleave(num_patches)  # (image, left-out patch), image-major
    cols = torch.arange(num_patches, device=images.device).repeat(n)
    drops = torch.empty(n * num_patches, device=images.device)
    for start in range(0, len(rows), chunk):
        b, i = rows[start:start + chunk], cols[start:start + chunk]
        probs = class_probability(model, images[b], temperature, leave_one_out[i])
        drops[start:start + chunk] = base[b] - probs.gather(1, target[b][:, None])[:, 0]
    return drops.reshape(n, num_patches).cpu(), target.cpu()


def source_maps(model: torch.nn.Module, images: torch.Tensor, source: str = "cls_attention",
                labels: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` weights in [0, 1] from ``source`` (``MAP_SOURCES``) for whole, un-augmented images.

    ``labels`` (``[B]``): the class that ``grad_attention`` and ``occlusion`` explain; None: the
    predicted class. Runs in eval mode (no drop-path, no dropout) and restores the mode."""
    if source not in MAP_SOURCES:
        raise ValueError(f"unknown map source {source!r}; choose one of {MAP_SOURCES}")
    if source == "cls_attention":
        return attention_maps(model, images)
    was_training = model.training
    model.eval()
    try:
        if source == "rollout":
            return rollout_maps(model, images)
        if source == "grad_attention":
            return grad_attention_maps(model, images, labels)
        drops, _ = occlusion_drops(model, images, target=labels)
        return _minmax(drops.to(images.device).clamp_min(0))
    finally:
        model.train(was_training)
