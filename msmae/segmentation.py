"""Segmentation transfer: the (MSMAE-)pre-trained ViT encoder with a SETR progressive-upsampling head.

Why SETR-PUP (Zheng et al., CVPR 2021) and not a UNETR-style head: it is the head of the
paper's own segmentation experiment, and it is *light* — the patch tokens of the last block,
reshaped to their grid, go through log2(patch) rounds of conv 3x3 + norm + GELU + 2x upsampling,
then a 1x1 conv. A UNETR head adds a convolutional pathway from the raw pixels at full
resolution, which can segment a lesion by itself and so hides how good the encoder is; here
the decoder cannot do much without the encoder, which is what an encoder comparison wants.

Any input size: images are resized to the encoder's size, and the logits back to the input's,
so a mask comes out at the size the image went in (odd sizes included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msmae.models import ViTPreset, build_vit, encode, get_preset


class ProgressiveUpsampling(nn.Module):
    """SETR-PUP: ``[B, D, g, g]`` token grid -> ``[B, out, g * 2**rounds, g * 2**rounds]`` logits."""

    def __init__(self, in_dim: int, width: int, rounds: int, out_channels: int = 1) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        dim = in_dim
        for _ in range(rounds):
            stages += [
                nn.Conv2d(dim, width, 3, padding=1, bias=False),
                nn.GroupNorm(min(8, width), width),
                nn.GELU(),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            ]
            dim = width
        self.stages = nn.Sequential(*stages)
        self.classify = nn.Conv2d(dim, out_channels, 1)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stages(grid))


class MSMAESegmenter(nn.Module):
    """ViT encoder (same architecture and weights layout as MSMAE pre-training's) + SETR-PUP head.

    ``forward(images)`` returns lesion logits ``[B, out_channels, H, W]`` at the input's size.
    """

    def __init__(self, preset: ViTPreset, decoder_width: int | None = None, out_channels: int = 1) -> None:
        super().__init__()
        if preset.patch_size & (preset.patch_size - 1):
            raise ValueError(f"patch size {preset.patch_size} is not a power of two; SETR-PUP upsamples by 2 per round")
        self.preset = preset
        self.encoder = build_vit(preset, num_classes=0, global_pool="token")
        width = decoder_width or max(32, preset.embed_dim // 3)
        self.decoder = ProgressiveUpsampling(preset.embed_dim, width, int(math.log2(preset.patch_size)), out_channels)

    def token_grid(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens (after the final norm) as a ``[B, D, g, g]`` grid."""
        tokens = encode(self.encoder, images)[:, self.encoder.num_prefix_tokens:]
        g = self.preset.grid
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *g)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        side = self.preset.img_size
        if tuple(size) != (side, side):
            images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        logits = self.decoder(self.token_grid(images))
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


def build_segmenter(preset: str | ViTPreset, img_size: int | None = None, patch_size: int | None = None,
                    decoder_width: int | None = None) -> MSMAESegmenter:
    """Segmenter by preset name (``tiny``, ``small``, ``base``) or ``ViTPreset``."""
    if isinstance(preset, str):
        preset = get_preset(preset, img_size, patch_size)
    return MSMAESegmenter(preset, decoder_width)


# Pre-training keys the segmenter's encoder does not have: the CLS classifier's head.
_PRETRAIN_ONLY = ("head.weight", "head.bias")


def load_encoder_for_segmentation(segmenter: MSMAESegmenter, pretrain_state: dict[str, torch.Tensor]) -> None:
    """Initialise the segmenter's encoder from an MSMAE/MAE pre-training ``state_dict``.

    Unlike the classifier (which mean-pools and has its own ``fc_norm``), the segmenter reads
    the encoder's output tokens through the encoder's final norm, so that norm is kept too.
    """
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in pretrain_state.items() if k.startswith(prefix) and k[len(prefix):] not in _PRETRAIN_ONLY}
    if not state:
        raise ValueError("the state holds no 'encoder.*' weights; pass an MSMAE pre-training model's state_dict")
    if state["pos_embed"].shape != segmenter.encoder.pos_embed.shape:
        raise ValueError(
            f"pre-training position embedding {tuple(state['pos_embed'].shape)} does not fit the segmenter's "
            f"{tuple(segmenter.encoder.pos_embed.shape)}: build the segmenter with the pre-training's preset, image and patch size"
        )
    result = segmenter.encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"encoder weights do not fit: missing {result.missing_keys}, unexpected {result.unexpected_keys}")


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, eps: float = 1.0) -> torch.Tensor:
    """BCE (per pixel) + soft Dice (per image): BCE gives every pixel a gradient, Dice keeps small
    lesions from being drowned by the background (HAM10000 lesions cover 1-97 % of an image)."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits).flatten(1)
    flat = target.flatten(1)
    dice = (2 * (probs * flat).sum(1) + eps) / (probs.sum(1) + flat.sum(1) + eps)
    return bce + dice_weight * (1 - dice).mean()


def dice_iou(predicted: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of boolean masks ``[B, ...]``; both empty counts as a perfect 1."""
    p, t = predicted.flatten(1).bool(), target.flatten(1).bool()
    inter = (p & t).sum(1).double()
    p_sum, t_sum = p.sum(1).double(), t.sum(1).double()
    union = p_sum + t_sum - inter
    empty = union == 0
    dice = torch.where(empty, torch.ones_like(inter), 2 * inter / (p_sum + t_sum).clamp_min(1))
    iou = torch.where(empty, torch.ones_like(inter), inter / union.clamp_min(1))
    return dice, iou
