"""Mixed precision: which autocast dtype a device gets for an ``amp`` setting (one resolver
for training, evaluation and prediction)."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: ``auto``: bf16 on a CUDA device that supports it, else fp16; float32 on CPU.
AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16/fp16 on CUDA only (``auto``: bf16 where supported); None
    means float32."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be auto, bf16, fp16 or off, got {amp!r}")
    if amp == "off" or device.type != "cuda":
        if amp in ("bf16", "fp16"):
            log.info("AMP %s requested but the device is %s; training in float32", amp, device)
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
