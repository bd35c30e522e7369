"""Speed options of the training step that leave its results bit-identical.

Each returns a callable that undoes it, so a host's model is handed back as it came.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def skip_lora_input_casts(model: nn.Module) -> Callable[[], None]:
    """Under autocast, stop peft's LoRA layers from casting their input to the fp32 LoRA weights'
    dtype. peft copies a bf16/fp16 activation to fp32 there, and autocast copies it straight
    back to bf16/fp16 for the matrix product: two dtype casts per LoRA layer in the forward pass
    and two more in the backward, for the same product (the round trip is exact). Only for plain
    LoRA layers without dropout (a dropout mask drawn in another dtype could differ), and only
    while every forward pass runs under autocast: without it the dtypes must match.
    """
    from peft.tuners.lora import LoraLayer

    changed: list[tuple[nn.Module, bool]] = []
    for module in model.modules():
        if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
            continue
        if any(getattr(module, "use_dora", {}).values()):
            continue
        if any(not isinstance(d, nn.Identity) for d in module.lora_dropout.values()):
            continue
        changed.append((module, getattr(module, "cast_input_dtype_enabled", True)))
        module.cast_input_dtype_enabled = False

    def undo() -> None:
        for module, before in changed:
            module.cast_input_dtype_enabled = before

    return undo
