"""Speed options of the training step that leave its results bit-identical.

Both touch only the LoRA layers, under autocast: :func:`skip_lora_input_casts` returns a callable
that undoes it, :class:`LoraWeightsCastOnce` acts only inside its ``active()`` context, so a
host's model is handed back as it came.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn


def _plain_lora_without_dropout(module: nn.Module) -> bool:
    """A peft LoRA layer without a variant (DoRA, ...) and without dropout (peft's, or kohya's
    rank and module dropout): the layers whose casts these options change (a dropout mask drawn
    in another dtype could differ)."""
    from peft.tuners.lora import LoraLayer

    from lora_trainer.lora.variants import DROPOUT_MARK

    if not isinstance(module, LoraLayer) or getattr(module, "lora_variant", None):
        return False
    if any(getattr(module, "use_dora", {}).values()) or getattr(module, DROPOUT_MARK, None):
        return False
    return all(isinstance(d, nn.Identity) for d in module.lora_dropout.values())


def skip_lora_input_casts(model: nn.Module) -> Callable[[], None]:
    """Under autocast, stop peft's LoRA layers from casting their input to the fp32 LoRA weights'
    dtype. peft copies a bf16/fp16 activation to fp32 there, and autocast copies it straight
    back to bf16/fp16 for the matrix product: two dtype casts per LoRA layer in the forward pass
    and two more in the backward, for the same product (the round trip is exact). Only for plain
    LoRA layers without dropout (a dropout mask drawn in another dtype could differ), and only
    while every forward pass runs under autocast: without it the dtypes must match.

    peft before 0.14 has no switch for that cast: there this changes nothing, and the cast goes
    with :class:`LoraWeightsCastOnce` instead (peft casts the input to the weights' dtype, which
    is then the autocast dtype).
    """
    changed: list[tuple[nn.Module, bool]] = []
    for module in model.modules():
        if not _plain_lora_without_dropout(module) or not hasattr(module, "cast_input_dtype_enabled"):
            continue
        changed.append((module, module.cast_input_dtype_enabled))
        module.cast_input_dtype_enabled = False

    def undo() -> None:
        for module, before in changed:
            module.cast_input_dtype_enabled = before

    return undo


class LoraWeightsCastOnce:
    """Under autocast, cast every fp32 LoRA weight to the autocast dtype in one kernel per
    forward pass instead of one per weight: the weights are concatenated, cast together, and
    each LoRA layer gets a view of the low-precision copy while the context is open. The values
    are the ones autocast would make, and the backward pass gives each weight the same fp32
    gradient (one concatenation and one cast instead of a cast per weight). Open it around the
    backward pass too: checkpointed blocks recompute their forward there and then take the same
    copy, where autocast would cast every weight again. Plain LoRA layers without dropout only;
    not with torch.compile (the weights change identity every pass)."""

    def __init__(self, models: list[nn.Module], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.slots: list[tuple[nn.Module, nn.Parameter]] = []
        for module in (m for model in models for m in model.modules()):
            if not _plain_lora_without_dropout(module):
                continue
            for holder in (*module.lora_A.values(), *module.lora_B.values()):
                weight = holder._parameters.get("weight")
                if isinstance(weight, nn.Parameter) and weight.dtype == torch.float32 and holder.bias is None:
                    self.slots.append((holder, weight))

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        if not self.slots or not torch.is_grad_enabled():
            yield
            return
        weights = [w for _, w in self.slots]
        low = torch.cat([w.reshape(-1) for w in weights]).to(self.dtype)
        pieces = low.split([w.numel() for w in weights])
        for (holder, weight), piece in zip(self.slots, pieces, strict=True):
            holder._parameters["weight"] = piece.view(weight.shape)  # a plain tensor, for this pass only
        try:
            yield
        finally:
            for holder, weight in self.slots:
                holder._parameters["weight"] = weight
