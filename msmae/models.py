"""MSMAE models assembled from timm's ViT: the pre-training model and the fine-tuning classifier.

Both wrap a timm ``VisionTransformer`` (its patch embedding, blocks with fused attention,
norms and head are used as they are); what MSMAE adds is *which tokens* go in:
``embed_tokens`` adds position embeddings to every patch and then keeps only the
visible ones, so dropped tokens cost nothing in the encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from msmae import defaults
from msmae.masking import MaskSplit

_norm_layer = partial(nn.LayerNorm, eps=1e-6)


@dataclass(frozen=True)
class ViTPreset:
    """Architecture of one model size; presets are data, looked up by name."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float = 4.0
    # Extra learned tokens beside CLS ("Vision Transformers Need Registers"): a place for the
    # model's global scratch work, which otherwise parks CLS attention on background patches.
    reg_tokens: int = 0

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus the register tokens: the tokens before the patches in every sequence."""
        return 1 + self.reg_tokens

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size,) * 2

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


PRESETS: dict[str, ViTPreset] = {
    # CPU-sized: 64 px, 8 px patches -> 8x8 = 64 tokens.
    "tiny": ViTPreset(64, 8, 192, 6, 3, decoder_dim=128, decoder_depth=2, decoder_heads=4),
    # ViT-S/16 at 224 px.
    "small": ViTPreset(224, 16, 384, 12, 6, decoder_dim=256, decoder_depth=4, decoder_heads=8),
    # ViT-B/16 at 224 px, the paper's model; MAE's decoder 512 x 8 blocks, 16 heads.
    "base": ViTPreset(224, 16, 768, 12, 12, decoder_dim=512, decoder_depth=8, decoder_heads=16),
}


def get_preset(name: str, img_size: int | None = None, patch_size: int | None = None, reg_tokens: int | None = None) -> ViTPreset:
    """Look up a preset by name, optionally at another image or patch size or with register tokens."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if img_size is not None or patch_size is not None or reg_tokens is not None:
        preset = replace(
            preset, img_size=img_size or preset.img_size, patch_size=patch_size or preset.patch_size,
            reg_tokens=preset.reg_tokens if reg_tokens is None else reg_tokens,
        )
    if preset.reg_tokens < 0:
        raise ValueError(f"reg_tokens={preset.reg_tokens} must be >= 0")
    if preset.img_size % preset.patch_size:
        raise ValueError(
            f"img_size={preset.img_size} is not divisible by patch_size={preset.patch_size}; "
            f"pick a multiple of {preset.patch_size}"
        )
    return preset


def sincos_pos_embed(grid: tuple[int, int], dim: int, prefix_tokens: int = 1) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with zero rows for CLS (and registers), ``[1, prefix + L, dim]``."""
    patches = build_sincos2d_pos_embed(list(grid), dim=dim)  # [L, dim]
    return torch.cat([torch.zeros(prefix_tokens, dim), patches], dim=0).unsqueeze(0)


def vit_kwargs(preset: ViTPreset, num_classes: int, global_pool: str, drop_path_rate: float) -> dict:
    """timm ``VisionTransformer`` arguments for a preset (registers included: timm's pooling skips them)."""
    return dict(
        img_size=preset.img_size, patch_size=preset.patch_size, embed_dim=preset.embed_dim, depth=preset.depth,
        num_heads=preset.num_heads, mlp_ratio=preset.mlp_ratio, qkv_bias=True, num_classes=num_classes,
        global_pool=global_pool, drop_path_rate=drop_path_rate, norm_layer=_norm_layer, reg_tokens=preset.reg_tokens,
    )


def init_sincos(vit: VisionTransformer, preset: ViTPreset) -> None:
    """Overwrite the position embedding with the fixed 2-D sin-cos one (zero rows for the prefix tokens)."""
    with torch.no_grad():
        vit.pos_embed.copy_(sincos_pos_embed(preset.grid, preset.embed_dim, preset.num_prefix_tokens))


def build_vit(preset: ViTPreset, num_classes: int, global_pool: str, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A timm ViT of the preset's size with a sin-cos initialised position embedding."""
    vit = VisionTransformer(**vit_kwargs(preset, num_classes, global_pool, drop_path_rate))
    init_sincos(vit, preset)
    return vit


def embed_tokens(vit: VisionTransformer, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Patch-embed the kept patches, add their positions, prepend CLS (and registers): ``[B, prefix + n, D]``.

    ``kept=None`` embeds all L patches (evaluation, attention maps). With ``kept``, only
    the kept patches are cut out and projected, so dropped patches cost nothing at all;
    each kept token carries the position of the patch it came from.
    """
    prefix = vit.num_prefix_tokens
    patch_pos = vit.pos_embed[:, prefix:]  # [1, L, D]
    if kept is None:
        x = vit.patch_embed(images) + patch_pos  # [B, L, D]
    else:
        x = _embed_kept_patches(vit, images, kept) + _gather_tokens(patch_pos.expand(kept.shape[0], -1, -1), kept)
    tokens = [vit.cls_token + vit.pos_embed[:, :1]]
    if vit.reg_token is not None:
        tokens.append(vit.reg_token + vit.pos_embed[:, 1:prefix])
    x = torch.cat([t.expand(x.shape[0], -1, -1) for t in tokens] + [x], dim=1)
    return vit.norm_pre(vit.pos_drop(x))


def _gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tokens[b, index[b]]`` for every b: ``[B, L, D], [B, n] -> [B, n, D]``."""
    return torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def _embed_kept_patches(vit: VisionTransformer, images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The patch-embedding convolution applied to the kept patches only: ``[B, n, D]``.

    A stride-p, p x p convolution is a linear map of each flattened (C, p, p) patch.
    """
    proj = vit.patch_embed.proj
    patch = proj.kernel_size[0]
    patches = F.unfold(images, kernel_size=patch, stride=patch).transpose(1, 2)  # [B, L, C*p*p]
    x = F.linear(_gather_tokens(patches, kept), proj.weight.flatten(1), proj.bias)
    return vit.patch_embed.norm(x)


def encode(vit: VisionTransformer, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Run the encoder on the kept tokens only: ``[B, 1 + n, D]`` after the final norm."""
    return vit.norm(vit.blocks(embed_tokens(vit, images, kept)))


class MSMAEPretrainModel(nn.Module):
    """Encoder + CLS classifier + MAE decoder.

    ``forward`` returns pixel predictions for the *masked* patches only and the CLS
    logits. The decoder sees the visible tokens and one mask token per masked patch;
    thrown patches are absent from the decoder and from the loss.
    """

    def __init__(self, preset: ViTPreset, num_classes: int) -> None:
        super().__init__()
        self.preset = preset
        self.num_classes = num_classes
        self.encoder = build_vit(preset, num_classes, global_pool="token")
        self.encoder.pos_embed.requires_grad_(False)  # fixed sin-cos, as in MAE

        dim = preset.decoder_dim
        self.decoder_embed = nn.Linear(preset.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(preset.grid, dim), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, preset.decoder_heads, preset.mlp_ratio, qkv_bias=True, norm_layer=_norm_layer)
              for _ in range(preset.decoder_depth)]
        )
        self.decoder_norm = _norm_layer(dim)
        self.decoder_pred = nn.Linear(dim, preset.patch_size**2 * 3)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_pred]:
            for sub in module.modules():
                if isinstance(sub, nn.Linear):
                    nn.init.xavier_uniform_(sub.weight)
                    nn.init.zeros_(sub.bias)

    def forward_encoder(self, images: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, images, kept)  # [B, prefix + n_kept, D]

    def forward_decoder(self, latent: torch.Tensor, kept: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Predict pixels of the masked patches: ``[B, n_masked, p*p*3]``.

        Attention is order-free given position embeddings, so tokens need no unshuffle:
        the decoder input is [CLS, visible..., mask tokens...] with each one's position.
        Register tokens, if any, stay in the encoder (as in the registers paper).
        """
        latent = torch.cat([latent[:, :1], latent[:, self.preset.num_prefix_tokens:]], dim=1)  # [B, 1 + n_kept, D]
        x = self.decoder_embed(latent)  # [B, 1 + n_kept, Dd]
        pos = self.decoder_pos_embed.expand(x.shape[0], -1, -1)
        visible_pos, masked_pos = _gather_tokens(pos[:, 1:], kept), _gather_tokens(pos[:, 1:], masked)
        x = torch.cat(
            [x[:, :1] + pos[:, :1], x[:, 1:] + visible_pos, self.mask_token + masked_pos], dim=1
        )
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x[:, 1 + kept.shape[1]:])

    def forward(self, images: torch.Tensor, split: MaskSplit) -> tuple[torch.Tensor, torch.Tensor]:
        latent = self.forward_encoder(images, split.kept)
        logits = self.encoder.forward_head(latent)  # CLS token -> classifier
        return self.forward_decoder(latent, split.kept, split.masked), logits

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """CLS-head logits on whole images: how well the head whose attention SAM will follow
        separates the classes (a gate for starting SAM), not a classifier to deploy."""
        return self.encoder.forward_head(encode(self.encoder, images))


class MSMAEClassifier(VisionTransformer):
    """The fine-tuning model: timm ViT with mean-pool -> LayerNorm -> linear head.

    ``forward(images, kept)`` runs on the visible tokens only (SAM fine-tuning);
    ``forward(images)`` uses every token (evaluation, inference).
    """

    def __init__(self, preset: ViTPreset, num_classes: int, drop_path_rate: float = defaults.DROP_PATH) -> None:
        # global_pool="avg": timm then uses fc_norm after pooling, no final norm
        super().__init__(**vit_kwargs(preset, num_classes, "avg", drop_path_rate))
        self.preset = preset
        init_sincos(self, preset)

    def forward(self, images: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(encode(self, images, kept))


def build_pretrain_model(
    preset: str | ViTPreset, num_classes: int, img_size: int | None = None, patch_size: int | None = None
) -> MSMAEPretrainModel:
    """Pre-training model by preset name (``tiny``, ``small``, ``base``) or ``ViTPreset``."""
    if isinstance(preset, str):
        preset = get_preset(preset, img_size, patch_size)
    return MSMAEPretrainModel(preset, num_classes)


def build_classifier(
    preset: str | ViTPreset,
    num_classes: int,
    img_size: int | None = None,
    patch_size: int | None = None,
    drop_path_rate: float = defaults.DROP_PATH,
) -> MSMAEClassifier:
    """Fine-tuning classifier by preset name or ``ViTPreset``."""
    if isinstance(preset, str):
        preset = get_preset(preset, img_size, patch_size)
    return MSMAEClassifier(preset, num_classes, drop_path_rate)


# Parameters of the classifier that pre-training does not provide.
_NEW_HEAD_KEYS = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}


def load_pretrained_encoder(classifier: MSMAEClassifier, source: MSMAEPretrainModel | dict) -> None:
    """Initialise the classifier's encoder from pre-training; its head stays new.

    ``source`` is a pre-training model or its ``state_dict``. Position embeddings are
    resampled (bicubic) when the patch grid differs, e.g. pre-training at 224 px and
    fine-tuning at 384 px.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    prefix = "encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise ValueError("source holds no 'encoder.*' weights; pass an MSMAEPretrainModel or its state_dict")
    for key in ["head.weight", "head.bias", "norm.weight", "norm.bias"]:  # CLS head and final norm
        encoder_state.pop(key, None)
    pos = encoder_state["pos_embed"]
    if pos.shape != classifier.pos_embed.shape:
        encoder_state["pos_embed"] = resample_abs_pos_embed(
            pos, new_size=list(classifier.patch_embed.grid_size), num_prefix_tokens=classifier.num_prefix_tokens
        )
    result = classifier.load_state_dict(encoder_state, strict=False)
    missing = set(result.missing_keys)
    if missing != _NEW_HEAD_KEYS or result.unexpected_keys:
        raise ValueError(
            f"encoder weights do not fit this classifier: missing {sorted(missing - _NEW_HEAD_KEYS)}, "
            f"unexpected {sorted(result.unexpected_keys)}; were both built from the same preset?"
        )


def preset_dict(preset: ViTPreset) -> dict:
    """Plain-dict form of a preset, for checkpoints and logged parameters."""
    return asdict(preset)
