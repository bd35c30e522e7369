"""Pre-flight memory estimate: predicted peak accelerator memory of a LoRA training step.

No rule of thumb: the UNet is built on PyTorch's ``meta`` device (no memory is allocated) with
LoRA layers injected, and one forward pass is traced. What autograd saves for the backward pass
is summed (parameters excluded: they are counted once as weights), with attention accounted as a
fused kernel saves it (q, k, v, output and log-sum-exp; not the full score matrix). With gradient
checkpointing the peak is the block boundaries plus the largest block's recomputed activations.

Peak = frozen weights resident on the device + LoRA parameters, gradients and optimizer state
+ saved activations + the largest transient buffers of the backward pass. It matches what
``torch.cuda.max_memory_allocated`` reports (the CUDA context itself is not included).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Text encoders and VAE parameter counts (full size), resident only when not cached/offloaded.
TEXT_ENCODER_PARAMS = {"sd1": 123_060_480, "sd2": 340_387_840, "sdxl": 123_060_480 + 694_659_840}
VAE_PARAMS = 83_653_863
LATENT_CHANNELS = 4


@dataclass
class MemoryEstimate:
    arch: str
    resolution: int
    batch_size: int
    rank: int
    precision: str
    gradient_checkpointing: bool
    cache_latents: bool
    weights_gb: float
    lora_gb: float
    activations_gb: float
    transient_gb: float
    total_gb: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def unet_config(arch: str) -> dict[str, Any]:
    """Full-size UNet config shipped with the package (the single-file loader uses the same files)."""
    from lora_trainer.models.checkpoint import CONFIGS_DIR

    cfg = json.loads((CONFIGS_DIR / arch / "unet" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
    """Stand-in for SDPA while tracing: output shape only, saving what a fused kernel saves."""
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
    return _FusedAttn.apply(q, k, v, out)


class _FusedAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # never run (meta tracing only)
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


class _SavedBytes:
    """Counts bytes autograd saves, skipping parameters and views of them."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in self.params and id(t) not in self.params:
            self.total += t.numel() * t.element_size()
        return t


def _build_meta_unet(arch: str, rank: int, dtype: torch.dtype) -> tuple[nn.Module, int]:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig, inject_adapter_in_model

    from lora_trainer.lora.targets import default_unet_targets

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules; the UNet has none
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(arch)).to(dtype)
    diffusers_logging.set_verbosity(level)
    with torch.device("meta"):
        unet.requires_grad_(False)
        targets = default_unet_targets(unet)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
    lora_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    for n, p in unet.named_parameters():
        p.requires_grad_("lora_" in n)
    return unet, lora_params


def _inputs(unet: nn.Module, arch: str, resolution: int, batch: int, dtype: torch.dtype) -> dict[str, Any]:
    cfg = unet.config
    side = resolution // 8
    kw: dict[str, Any] = {
        "sample": torch.empty(batch, LATENT_CHANNELS, side, side, device="meta", dtype=dtype),
        "timestep": torch.zeros(batch, device="meta", dtype=torch.long),
        "encoder_hidden_states": torch.empty(batch, 77, cfg.cross_attention_dim, device="meta", dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return kw


@functools.lru_cache(maxsize=64)
def trace_activations(arch: str, resolution: int, rank: int, precision: str) -> dict[str, int]:
    """Bytes saved for backward at batch 1: in total, for the largest top-level block, and at block
    boundaries. Activation memory is linear in the batch size, so callers scale these."""
    batch = 1
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet, lora_params = _build_meta_unet(arch, rank, dtype)
    counter = _SavedBytes({id(p) for p in unet.parameters()})
    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    per_block: list[int] = []
    boundary = [0]

    def pre(_m: nn.Module, _args: Any) -> None:
        per_block.append(-counter.total)

    def post(_m: nn.Module, _args: Any, out: Any) -> None:
        per_block[-1] += counter.total
        first = out[0] if isinstance(out, tuple) else out
        boundary[0] += first.numel() * first.element_size()

    hooks = [b.register_forward_pre_hook(pre) for b in blocks] + [b.register_forward_hook(post) for b in blocks]
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            unet(**_inputs(unet, arch, resolution, batch, dtype))
    finally:
        F.scaled_dot_product_attention = original
        for h in hooks:
            h.remove()
    weights = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora_" not in n)
    return {"total": counter.total, "max_block": max(per_block), "boundaries": boundary[0],
            "lora_params": lora_params, "weight_bytes": weights}


def estimate_peak_memory(arch: str, resolution: int, batch_size: int = 1, rank: int = 16,
                         precision: str = "bf16", gradient_checkpointing: bool = False,
                         cache_latents: bool = True, train_text_encoder: bool = False) -> MemoryEstimate:
    """Predicted peak accelerator memory (GiB figures) of a UNet LoRA training step."""
    act_dtype = precision if precision in ("fp16", "bf16") else "fp32"
    tr = dict(trace_activations(arch, resolution, rank, act_dtype))
    for key in ("total", "max_block", "boundaries"):
        tr[key] *= batch_size
    weights = tr["weight_bytes"]
    if not cache_latents:
        weights += VAE_PARAMS * DTYPE_BYTES[act_dtype]
    if train_text_encoder or not cache_latents:
        weights += TEXT_ENCODER_PARAMS[arch] * DTYPE_BYTES[act_dtype]
    # LoRA: fp32 parameters + fp32 gradients + AdamW's two fp32 moments.
    lora = tr["lora_params"] * 4 * 4
    if gradient_checkpointing:
        activations = tr["boundaries"] + tr["max_block"]
    else:
        activations = tr["total"]
    # Backward transients: gradient buffers of the largest block's activations (roughly half of them
    # are alive at once) plus the model output and its gradient.
    side = resolution // 8
    out_bytes = batch_size * LATENT_CHANNELS * side * side * 4 * 3
    transient = tr["max_block"] // 2 + out_bytes
    total = weights + lora + activations + transient
    return MemoryEstimate(arch, resolution, batch_size, rank, precision, gradient_checkpointing, cache_latents,
                          weights / GiB, lora / GiB, activations / GiB, transient / GiB, total / GiB)


def choose_settings(free_gb: float, arch: str, reserve_gb: float = 1.5, resolution: int | None = None,
                    rank: int = 16, precision: str = "bf16", model_resident: bool = False) -> dict[str, Any]:
    """The fastest settings predicted to fit ``free_gb - reserve_gb``: the biggest batch without
    gradient checkpointing, else with it; resolution defaults to the family's native one.

    ``model_resident``: the UNet's weights are already in memory (a WebUI's loaded model), so
    they are not part of what must still fit."""
    res = resolution or {"sd1": 512, "sd2": 768, "sdxl": 1024}[arch]
    budget = free_gb - reserve_gb
    if model_resident:
        budget += trace_activations(arch, res, rank, precision)["weight_bytes"] / GiB
    for checkpointing in (False, True):
        best = None
        for batch in (8, 6, 4, 3, 2, 1):
            est = estimate_peak_memory(arch, res, batch, rank, precision, checkpointing)
            if est.total_gb <= budget:
                best = est
                break
        if best is not None:
            return {"batch_size": best.batch_size, "gradient_checkpointing": checkpointing,
                    "resolution": res, "rank": rank, "mixed_precision": precision,
                    "estimated_peak_gb": round(best.total_gb, 2), "fits": True}
    est = estimate_peak_memory(arch, res, 1, rank, precision, True)
    return {"batch_size": 1, "gradient_checkpointing": True, "resolution": res, "rank": rank,
            "mixed_precision": precision, "estimated_peak_gb": round(est.total_gb, 2),
            "fits": est.total_gb <= budget and not math.isnan(est.total_gb)}
