"""Mixed precision where it pays: one rule for every forward pass of the method.

Its own module because both the step functions (``msmae.engine``) and the map sources
(``msmae.map_sources``, which the engine imports) run forward passes under it.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast where the device runs it fast (CUDA with bf16); a no-op elsewhere.

    CPU bf16 autocast is slower than fp32 on most CPUs, so CPU runs stay fp32.
    """
    device = torch.device(device)
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
