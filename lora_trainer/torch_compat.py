"""What differs between the torch (and transformers) versions we support, in one place.

The oldest supported torch is 2.1 and transformers 4.30 (the A1111 WebUI v1.10 pins 2.1.2 and
4.30.2); the newest releases must work too. Code elsewhere calls these helpers instead of an API
that exists only in newer versions.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import types
import warnings
from collections.abc import Iterator
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


def enable_hf_checkpointing(model: Any) -> Any:
    """Gradient checkpointing on a transformers model, non-reentrant where the version allows;
    returns the call that turns it off again.

    transformers 5 names it ``activation_checkpointing_enable``; before 4.35 it takes no
    arguments and checkpoints re-entrantly, which passes gradients only to inputs that require
    them, so the input embeddings are made to (for LoRA layers behind a frozen embedding)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        return model.activation_checkpointing_disable
    try:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    except TypeError:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
            return lambda: (model.gradient_checkpointing_disable(), model.disable_input_require_grads())
    return model.gradient_checkpointing_disable


# The meta device has no autocast: the memory estimate's trace stands in for CUDA's
# (bench/estimate.py) and says here which dtype it computes in, for code that asks.
_meta_autocast = threading.local()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` now, or None when it is off there
    (``torch.is_autocast_enabled(device_type)`` exists from torch 2.4; before, CPU and CUDA each
    have their own functions). On "meta": the estimate's stand-in for CUDA autocast, if active."""
    if device_type == "meta":
        return getattr(_meta_autocast, "dtype", None)
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return None
    except (TypeError, AttributeError):  # torch < 2.4: no device argument
        pass
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None


@contextlib.contextmanager
def meta_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """What :func:`autocast_dtype` says for "meta" in this thread while the context runs."""
    before = getattr(_meta_autocast, "dtype", None)
    _meta_autocast.dtype = dtype
    try:
        yield
    finally:
        _meta_autocast.dtype = before


def autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off on ``device_type`` for the block (the meta stand-in's too)."""
    if device_type == "meta":
        return meta_autocast(None)
    return torch.autocast(device_type, enabled=False)


@contextlib.contextmanager
def meta_checkpointing() -> Iterator[None]:
    """Lets ``torch.utils.checkpoint`` run on meta tensors (the memory estimate's trace). Older
    torch (2.1, A1111's) looks up a device module ``torch.<device type>`` for the checkpoint's
    device, "meta" here, and fails ("module 'torch' has no attribute 'meta'"); an empty module
    for the block says that meta has no autocast and no RNG state, which is what the trace needs
    (it does not preserve RNG state). Newer torch handles meta itself: nothing is changed there."""
    from torch.utils import checkpoint

    try:
        checkpoint._get_device_module("meta")  # newer torch: the meta device itself
        knows_meta = True
    except AttributeError:
        knows_meta = False
    if knows_meta or hasattr(torch, "meta"):
        yield
        return
    torch.meta = types.ModuleType("torch.meta")  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del torch.meta  # type: ignore[attr-defined]
