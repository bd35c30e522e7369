"""GroupNorm and LayerNorm in the compute dtype under mixed precision.

CUDA autocast runs ``group_norm`` and ``layer_norm`` in fp32: per norm and step it copies the
bf16/fp16 input to fp32 and the frozen weight and bias too, computes in fp32, and the next
matrix product or convolution copies the fp32 output back; the backward pass casts the gradients
both ways again. Autograd keeps the fp32 copies for the backward pass (the input, and a
GroupNorm's output for the SiLU after it). The norms' CUDA kernels accumulate their statistics
in fp32 for bf16/fp16 inputs anyway, so a norm computed in the input's dtype differs only in
where its output is rounded: a LayerNorm feeds a linear layer, which rounds it to the same dtype
either way; a GroupNorm's output is rounded before the SiLU instead of after it.

:func:`norms_in_compute_dtype` gives the frozen norms of a model a forward that computes in the
autocast dtype with autocast switched off for the call: no casts, half the bytes kept. CPU
autocast already leaves the norms in the input's dtype, so there (and without autocast) the
forward is the layer's own. ``train.fp32_norms`` keeps autocast's rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.torch_compat import autocast_dtype, autocast_off
from lora_trainer.train import forwards

# Device types whose autocast computes the norms in fp32 ("meta": the memory estimate's stand-in
# for CUDA autocast).
UPCASTING = ("cuda", "meta")


def _in_compute_dtype(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``layer.forward``: the norm in the autocast dtype when autocast would upcast
    it, the layer's own forward otherwise."""
    on = isinstance(x, torch.Tensor) and x.device.type in UPCASTING and not (args or kwargs)
    amp = autocast_dtype(x.device.type) if on else None
    if amp is None or x.dtype != amp:
        return type(self).forward(self, x, *args, **kwargs)
    w, b = self.weight, self.bias
    w = w.to(x.device, amp) if w is not None else None
    b = b.to(x.device, amp) if b is not None else None
    with autocast_off(x.device.type):
        if isinstance(self, nn.GroupNorm):
            return F.group_norm(x, self.num_groups, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """``model``'s GroupNorm and LayerNorm layers (their subclasses too: the WebUIs' ``GroupNorm32``
    and cast-per-call norms compute the same function) whose parameters do not train; not those
    whose class says it runs in fp32 (diffusers' ``FP32LayerNorm``, kept so on purpose)."""
    return [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
            and "FP32" not in type(m).__name__.upper()
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def norms_in_compute_dtype(model: nn.Module) -> Callable[[], None]:
    """Give ``model``'s frozen norms the forward that computes in the autocast dtype on the
    :data:`UPCASTING` devices (not those with a forward of their own already); returns the undo."""
    return forwards.install(norm_layers(model), _in_compute_dtype)


def count(model: nn.Module) -> int:
    """How many of ``model``'s layers compute their norm in the compute dtype now."""
    return forwards.count(model, _in_compute_dtype)
