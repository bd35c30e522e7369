"""A lean forward for plain peft LoRA Linear layers: fewer ops and less Python per call.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: two matrix products, a
multiply and an add forward, and in the backward the multiply's gradient on top of the four
products. :class:`_LoraAddmm` computes the same sum as ``h = x·Aᵀ`` and one
``addmm(result, h, Bᵀ, alpha=scaling)``, and its hand-written backward folds the scaling into
the two products that need it (``addmm`` with ``beta=0``): 2 ops forward and 4 backward
instead of 4 and 5, and no submodule calls. peft has no such fused path, hence this module.

The sum is rounded once instead of three times, so results may differ from peft's in the last
bits of the compute dtype; a run is still deterministic (resume stays bit-identical), and the
saved file is the same parameters under the same keys.

Only for plain layers (peft ``Linear``, no variant, no DoRA wrapper, no dropout, no LoRA bias);
each call also checks what the sampler or a host may change (adapters disabled or merged, the
active adapter, extra arguments) and hands those calls to peft's own forward, reading the
current ``scaling`` every time. :func:`lean_lora_forward` returns the callable that takes it off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.torch_compat import autocast_dtype
from lora_trainer.train import forwards


class _LoraAddmm(torch.autograd.Function):
    """``result + scale · (x·Aᵀ)·Bᵀ`` with ``x``, ``a``, ``b`` and ``result`` in one dtype."""

    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(x2, a.t())
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.t(), alpha=scale)
        ctx.save_for_backward(x2, h, a, b)
        ctx.scale, ctx.x_shape = scale, x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, a, b = ctx.saved_tensors
        need_result, need_x, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        s = ctx.scale
        # beta=0: the first argument only gives the shape; its values are ignored (NaN included)
        gb = torch.addmm(b, g.t(), h, beta=0, alpha=s) if need_b else None
        gh = torch.addmm(h, g, b, beta=0, alpha=s) if need_x or need_a else None
        ga = torch.mm(gh.t(), x2) if need_a else None
        gx = torch.mm(gh, a).view(ctx.x_shape) if need_x else None
        return (grad if need_result else None), gx, ga, gb, None


def _peft_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(layer).forward(layer, x, *args, **kwargs)


def _lean_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Installed as ``layer.forward``: the fused sum for a plain call, peft's forward otherwise."""
    active = self.active_adapter
    name = active if isinstance(active, str) else active[0] if len(active) == 1 else None
    if (args or kwargs or name is None or name not in self.lora_A or self.disable_adapters or self.merged
            or not isinstance(self.lora_dropout[name], nn.Identity)):
        return _peft_forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    a, b, scale = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    amp = autocast_dtype(x.device.type)
    if result.dtype != (amp or a.dtype) or (amp is None and b.dtype != a.dtype):
        return _peft_sum(self, name, x, result)  # a base layer that returns another dtype
    dtype = amp or a.dtype  # what autocast computes in; without it, peft's cast to the weights' dtype
    return _LoraAddmm.apply(result, x.to(dtype), a.to(dtype), b.to(dtype), float(scale))


def _peft_sum(layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """peft's own arithmetic for one adapter, on a result already computed."""
    a = layer.lora_A[name]
    cast = getattr(layer, "_cast_input_dtype", None)  # peft >= 0.14; before, the input was always cast
    x = cast(x, a.weight.dtype) if cast is not None else x.to(a.weight.dtype)
    return (result + layer.lora_B[name](a(x)) * layer.scaling[name]).to(result.dtype)


def _lean_candidates(model: nn.Module) -> list[nn.Module]:
    """peft LoRA Linear layers with no variant, no dropout and no LoRA bias, not inside DoRA."""
    from peft.tuners.lora import Linear as LoraLinear

    from lora_trainer.lora.dora import ColumnDora
    from lora_trainer.train.speed import _plain_lora_without_dropout

    in_dora = {id(m.lora) for m in model.modules() if isinstance(m, ColumnDora)}
    out = []
    for m in model.modules():
        if type(m) is not LoraLinear or id(m) in in_dora or not _plain_lora_without_dropout(m):
            continue
        holders = (*m.lora_A.values(), *m.lora_B.values())
        if all(getattr(h, "bias", None) is None for h in holders) and "forward" not in vars(m):
            out.append(m)
    return out


def lean_lora_forward(model: nn.Module) -> Callable[[], None]:
    """Give every plain peft LoRA Linear layer of ``model`` the lean forward; returns the undo."""
    return forwards.install(_lean_candidates(model), _lean_forward)


def lean_layers(model: nn.Module) -> int:
    """How many layers of ``model`` run the lean forward now."""
    return forwards.count(model, _lean_forward)
