"""DoRA with the magnitude per input channel: the DoRA every WebUI loader applies the same way.

Hand-rolled on top of peft's LoRA layer because peft's DoRA (``LoraConfig(use_dora=True)``)
normalises W + ΔW per *output* row, and no loader reads that back: A1111 v1.10.1
(``NetworkModule.apply_weight_decompose``) always normalises per *input* column, and ComfyUI's
and Forge's ``weight_decompose`` take a ``dora_scale`` of shape (out, 1) to mean output rows but
divide by the norm of the base weight W, not of W + ΔW. All three agree on a ``dora_scale`` of
shape (1, in[, 1, 1]): W' = (W + ΔW) · dora_scale / ‖W + ΔW‖ with the norm over each input
column (ComfyUI and Forge add a float epsilon to the norm). That is what this layer trains, so
the saved file gives every loader the trained weights.

The LoRA update ΔW = scale · up @ down is peft's own layer (``get_delta_weight``); the strength
``multiplier`` blends like the loaders do: W + m · (W' - W).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

ADAPTER = "default"


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input column: shape (1, in[, 1, 1]) (A1111's ``merged_scale1_norm``)."""
    w = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return w.norm(dim=1, keepdim=True).reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


class ColumnDora(nn.Module):
    """Wraps a peft LoRA Linear/Conv2d layer (kept as ``.lora``) and adds ``dora_scale``."""

    def __init__(self, lora_layer: nn.Module) -> None:
        super().__init__()
        self.lora = lora_layer
        base = lora_layer.get_base_layer()
        # Starts at the base weight's own norms, so a fresh DoRA is the base layer (ΔW = 0).
        self.dora_scale = nn.Parameter(column_norm(base.weight.detach().float()))
        self.multiplier = 1.0

    def merged_weight(self) -> torch.Tensor:
        """W' in fp32 at the current strength."""
        base = self.lora.get_base_layer()
        w = base.weight.float()
        merged = w + self.lora.get_delta_weight(ADAPTER).float()
        dora = merged * (self.dora_scale / column_norm(merged))
        return dora if self.multiplier == 1.0 else w + self.multiplier * (dora - w)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.lora.get_base_layer()
        if self.multiplier == 0.0:
            return base(x, *args, **kwargs)
        w = self.merged_weight().to(base.weight.dtype)  # what a loader merges into the model
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, w, base.bias)
        return F.linear(x, w, base.bias)

    def __getattr__(self, name: str) -> Any:
        # Callers read layer attributes (in_features, kernel_size, ...) from the module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("lora"), name)
