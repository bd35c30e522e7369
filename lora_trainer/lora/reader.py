"""Read a LoRA file the way the WebUI loaders do: each module's ΔW from its tensors alone.

This follows A1111 v1.10.1's extensions-builtin/Lora (``network_lora``, ``network_hada``,
``network_lokr`` and ``NetworkModule.finalize_updown``/``apply_weight_decompose``); Forge's and
ComfyUI's loaders compute the same ΔW for these kinds (ComfyUI and Forge add a float epsilon to
the DoRA norm). It shares no code with the training layers, so a test that merges these deltas
into a model and compares it with the trained one checks the file, not our own reading of it.

* LoRA: up @ down (reshaped to the layer's weight), scale alpha / rank(down).
* LoHa: (w1_a @ w1_b) ⊙ (w2_a @ w2_b), scale alpha / rank(w1_b).
* LoKr: kron(w1, w2) with w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b (same for w2; a 4-D w2 takes w1
  as 1x1 kernels), scale alpha / rank of the factorised pair, 1 when both factors are whole.
* DoRA (any kind with ``dora_scale``): W' = (W + ΔW) · dora_scale / ‖W + ΔW‖ per input column.
* Strength m: W + m · ΔW (DoRA: W + m · (W' - W)).
"""

from __future__ import annotations

import torch
from torch import nn

from lora_trainer.lora.kohya_tensors import ModuleTensors, read_modules


def _pair(t: dict[str, torch.Tensor], a: str, b: str) -> torch.Tensor:
    return t[a].float().reshape(t[a].shape[0], -1) @ t[b].float().reshape(t[b].shape[0], -1)


def updown(m: ModuleTensors, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """The module's unscaled ΔW, in the layer's weight shape (fp32)."""
    t = m.tensors
    if m.kind in ("lora", "dora"):
        d = _pair(t, "lora_up.weight", "lora_down.weight")
    elif m.kind == "loha":
        d = _pair(t, "hada_w1_a", "hada_w1_b") * _pair(t, "hada_w2_a", "hada_w2_b")
    else:
        w1 = t["lokr_w1"].float() if "lokr_w1" in t else _pair(t, "lokr_w1_a", "lokr_w1_b")
        w2 = t["lokr_w2"].float() if "lokr_w2" in t else _pair(t, "lokr_w2_a", "lokr_w2_b")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2)
    if d.numel() != torch.Size(shape).numel():
        raise ValueError(f"{m.kind} update has {d.numel()} values; the layer's weight {tuple(shape)} has "
                         f"{torch.Size(shape).numel()}")
    return d.reshape(shape)


def scale(m: ModuleTensors) -> float:
    """alpha / rank as the loaders take it (1 without a rank: LoKr with two whole factors)."""
    return m.alpha / m.rank if m.rank else 1.0


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    w = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    return w.norm(dim=1, keepdim=True).reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def module_delta(m: ModuleTensors, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """What a loader adds to ``weight`` (the layer's weight) for module ``m`` at strength ``multiplier``."""
    w = weight.float()
    delta = updown(m, w.shape) * scale(m)
    if "dora_scale" in m.tensors:
        merged = w + delta
        delta = merged * (m.tensors["dora_scale"].float() / column_norm(merged)) - w
    return delta * multiplier


def merge_file(tensors: dict[str, torch.Tensor], layers: dict[str, nn.Module], multiplier: float = 1.0) -> int:
    """Add every module's ΔW to ``layers[key].weight`` in place (like A1111 merging a LoRA);
    ``layers`` maps file module keys to Linear/Conv2d layers. Returns how many were merged."""
    modules = read_modules(tensors)
    missing = [k for k in modules if k not in layers]
    if missing:
        raise KeyError(f"no layer for LoRA module {missing[0]!r} ({len(missing)} unmatched)")
    with torch.no_grad():
        for key, m in modules.items():
            layer = layers[key]
            layer.weight += module_delta(m, layer.weight, multiplier).to(layer.weight.dtype)
    return len(modules)
