"""The optimiser of each stage: one builder, used by the Ray worker and the comparison runner alike.

Pre-training is MAE's AdamW (β₂ = 0.95, no weight decay on biases, norms and embeddings);
fine-tuning adds layer-wise lr decay (BEiT/MAE): blocks near the input move less.
"""

from __future__ import annotations

from typing import Literal

import torch

from msmae.defaults import LAYER_DECAY, PRETRAIN_BETAS, WEIGHT_DECAY

Stage = Literal["pretrain", "finetune"]


def layer_decay_param_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with layer-wise lr decay for fine-tuning (timm's BEiT-style grouping).

    Blocks near the input get ``layer_decay ** depth`` of the lr (``lr_scale``, which
    ``set_lr`` honours); the head gets the full lr. Biases, norms, position embeddings and
    the CLS token get no weight decay.
    """
    from timm.optim import param_groups_layer_decay

    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    return param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)


def build_optimizer(
    model: torch.nn.Module,
    stage: Stage,
    weight_decay: float = WEIGHT_DECAY,
    layer_decay: float = LAYER_DECAY,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW for ``stage``; ``layer_decay`` applies to fine-tuning only (1.0 = none).

    ``fused`` defaults to the model's device being CUDA (the fused kernel is CUDA-only).
    The learning rate is set per step by the loop (``set_lr``), so none is given here.
    """
    if fused is None:
        fused = next(model.parameters()).device.type == "cuda"
    if stage == "pretrain":
        from timm.optim import param_groups_weight_decay

        return torch.optim.AdamW(param_groups_weight_decay(model, weight_decay), betas=PRETRAIN_BETAS, fused=fused)
    if stage == "finetune":
        return torch.optim.AdamW(layer_decay_param_groups(model, weight_decay, layer_decay), fused=fused)
    raise ValueError(f"unknown stage {stage!r}; expected 'pretrain' or 'finetune'")
