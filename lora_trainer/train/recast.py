"""Layers that cast their stored weights per call, trained without keeping every cast.

A host may store a model narrower (or just other) than it computes and have each layer cast its
weight at every call: Forge does (``--bf16-unet`` on a CPU, fp16 storage on a card that computes
in fp32). Inference forgets each copy at once; a training step does not: a frozen layer's
backward pass needs its weight, so autograd keeps every call's cast copy until the backward pass
reaches the layer. Without gradient checkpointing that is the whole model once more, in the
computation dtype.

:func:`recast_in_backward` gives each such layer a forward that casts the weight itself, lets the
layer's own forward use that copy (a host's cast of a tensor that already has the dtype and device
is the tensor itself: Forge Neo's ``cast_to``, Classic's ``cast_to_device``), and saves, for the
copy and its views, only how to make them again: the backward pass casts the weight once more.
Casting is exact, so the gradients are bit for bit the same; the cost is one cast per layer in the
backward pass, where checkpointing would run the whole forward again.

Not with gradient checkpointing: these saved-tensor hooks, inside each layer, would hide what the
layer saves from checkpointing's own (which keep one block's copies at a time anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from lora_trainer.train import forwards


class _Recast(NamedTuple):
    """What a saved cast copy (or a view of it) is remade from in the backward pass."""

    source: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    size: torch.Size
    stride: tuple[int, ...]
    offset: int


def _unpack(saved: Any) -> Any:
    if isinstance(saved, _Recast):
        weight = saved.source.detach().to(saved.device, saved.dtype)
        return torch.as_strided(weight, saved.size, saved.stride, saved.offset)
    return saved


def _forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """Installed as ``layer.forward``: the layer's own forward on a copy it is given, saved as a recipe."""
    weight = self._parameters.get("weight")
    if (weight is None or weight.requires_grad or not torch.is_grad_enabled() or not isinstance(x, torch.Tensor)
            or (weight.dtype == x.dtype and weight.device == x.device)):
        return type(self).forward(self, x, *args, **kwargs)
    # autograd keeps the hooks with every tensor they packed: the copy goes in a holder emptied
    # after the forward, or the pack hook itself would keep it alive
    held = [weight.detach().to(x.device, x.dtype)]

    def pack(t: torch.Tensor) -> Any:
        copy = held[0]
        if t is copy or t._base is copy:
            return _Recast(weight, copy.dtype, copy.device, t.size(), t.stride(), t.storage_offset())
        return t

    self._parameters["weight"] = held[0]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            return type(self).forward(self, x, *args, **kwargs)
    finally:
        self._parameters["weight"] = weight
        held.clear()


def recast_in_backward(layers: Iterable[nn.Module]) -> Callable[[], None]:
    """Give each layer (one that casts its stored weight to its input's dtype and device per call)
    the forward above; returns the callable that takes it off again. Not the norms: their weights
    are a few hundred numbers each, and under mixed precision train/norms.py gives them its own
    forward (in the compute dtype)."""
    return forwards.install([m for m in layers if not isinstance(m, (nn.GroupNorm, nn.LayerNorm))], _forward)


def recasting(model: nn.Module) -> int:
    """How many layers of ``model`` recast their weight in the backward pass now."""
    return forwards.count(model, _forward)
