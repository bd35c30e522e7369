"""What differs between the torch versions we support, in one place.

The oldest supported torch is 2.1 (the A1111 WebUI v1.10 pins 2.1.2); the newest release must work
too. Code elsewhere calls these helpers instead of an API that exists only in newer versions.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

MIN_TORCH = (2, 1)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch, e.g. (2, 1) for "2.1.2+cu121"."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def grad_scaler(device_type: str, enabled: bool) -> Any:
    """A GradScaler for fp16 training on ``device_type`` (a no-op one when not ``enabled``).

    ``torch.amp.GradScaler(device)`` exists from torch 2.3; before that only CUDA has a scaler
    (``torch.cuda.amp.GradScaler``), and fp16 autocast is CUDA-only there anyway.
    """
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether ``AdamW(fused=True)`` runs on ``device``: CUDA from torch 2.0, the CPU from 2.4."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch_version() >= (2, 4)


@functools.cache
def autocast_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether autocast to ``dtype`` runs on ``device_type`` (torch 2.1 has only bfloat16 on the
    CPU: it warns when the context is made and raises when it is entered)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.autocast(device_type, dtype=dtype):
                pass
    except (RuntimeError, ValueError):
        return False
    return True
