"""Supervised attention maps: where the CLS token of the last block looks.

timm's blocks use fused attention (SDPA), which never materialises attention
probabilities. Rather than switching every block to the slow path, we run all blocks
but the last as usual and recompute only the CLS query's row of the last block from its
``qkv`` projection: ``[B, heads, 1, N]`` instead of ``[B, heads, N, N]``.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from msmae.models import embed_tokens


def cls_attention(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention probabilities from the CLS query to all tokens, ``[B, heads, N]``.

    ``N`` includes the prefix (CLS) token at position 0. The last block's own output is
    never needed, so it is not computed.
    """
    x = embed_tokens(vit, images)
    for block in vit.blocks[:-1]:
        x = block(x)
    last = vit.blocks[-1]
    attn = last.attn
    h = last.norm1(x)
    batch, tokens, _ = h.shape
    qkv = attn.qkv(h).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])  # [B, H, N, hd]
    q_cls = q[:, :, :1].float()  # [B, H, 1, hd]
    logits = (q_cls * attn.scale) @ k.float().transpose(-2, -1)  # [B, H, 1, N]
    return logits.softmax(dim=-1).squeeze(2)


def minmax_heads(cls_to_patches: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each head over the patches, then average heads: ``[B, H, L] -> [B, L]``.

    A head whose weights are all equal carries no preference; it contributes zeros
    instead of dividing by zero.
    """
    low = cls_to_patches.amin(dim=-1, keepdim=True)
    span = cls_to_patches.amax(dim=-1, keepdim=True) - low
    normalised = (cls_to_patches - low) / span.clamp_min(torch.finfo(cls_to_patches.dtype).tiny)
    return normalised.mean(dim=1)


@torch.no_grad()
def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-patch attention weights in [0, 1], ``[B, L]``, for whole un-augmented images.

    Works for the pre-training model and the fine-tuning classifier alike (both hold a
    timm ``VisionTransformer``). Runs in eval mode (no drop-path) and restores the mode.
    """
    vit = encoder_of(model)
    was_training = vit.training
    vit.eval()
    try:
        probs = cls_attention(vit, images)
    finally:
        vit.train(was_training)
    return minmax_heads(probs[:, :, vit.num_prefix_tokens:])


def encoder_of(model: torch.nn.Module) -> VisionTransformer:
    """The timm ViT inside a model of this package (or the model itself)."""
    if isinstance(model, VisionTransformer):
        return model
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, VisionTransformer):
        return encoder
    raise TypeError(f"{type(model).__name__} holds no timm VisionTransformer (expected .encoder)")
