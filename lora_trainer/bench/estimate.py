"""Pre-flight memory estimate: predicted peak accelerator memory of a LoRA training step.

No rule of thumb: the UNet is built on PyTorch's ``meta`` device (no memory is allocated) with
LoRA layers injected, and one forward pass is traced the way the trainer runs it (weights in the
training dtype, CUDA autocast's casting rules, fp32 LoRA weights). What autograd saves for the
backward pass is summed, each storage once (parameters excluded: they are counted once as
weights), with attention accounted as a fused kernel saves it (q, k, v, output and log-sum-exp;
not the full score matrix). With gradient checkpointing, diffusers checkpoints every resnet and
transformer block: those units keep only their inputs, and one unit at a time is recomputed.

Peak = frozen weights resident on the device + LoRA parameters and optimizer state + the
larger of (saved activations + the model output and loss buffers) and (LoRA gradients + the
optimizer step's temporaries). It predicts what
``torch.cuda.max_memory_allocated`` reports (the CUDA context itself is not included);
:mod:`lora_trainer.bench.memcheck` measures the same quantity for a real step on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lora_trainer.families import get_family

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Text encoders and VAE parameter counts (full size), resident only when not cached/offloaded.
VAE_PARAMS = 83_653_863
LATENT_CHANNELS = 4
# Extra room choose_settings leaves on top of the predicted activations: the CUDA caching
# allocator's fragmentation and cuDNN/cuBLAS workspaces are not part of the estimate.
ACTIVATION_HEADROOM = 0.25


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
    """Counts bytes autograd saves for the backward pass: each storage once (three projections
    saving the same input keep one tensor alive), parameters and views of them never."""

    def __init__(self, params: set[int]) -> None:
        self.params = params
        self.total = 0
        self.seen: dict[int, int] = {}  # storage -> bytes, in the order first saved
        self.keep: list[torch.Tensor] = []  # held, so no storage address is reused while tracing

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) in self.params or id(t) in self.params:
            return t
        key = t.untyped_storage()._cdata
        if key not in self.seen:
            size = t.untyped_storage().nbytes() or t.numel() * t.element_size()
            self.seen[key] = size
            self.keep.append(t)
            self.total += size
        return t

    def forget_since(self, mark: int) -> None:
        """Drop what was counted after ``mark`` (the ``len(seen)`` then)."""
        for key in list(self.seen)[mark:]:
            self.total -= self.seen.pop(key)


class _CheckpointUnits:
    """Stands in for ``torch.utils.checkpoint.checkpoint`` while tracing: each checkpointed unit
    (diffusers checkpoints every resnet and transformer block) keeps only its inputs, and the
    backward pass recomputes one unit at a time, last unit first. When it recomputes a unit,
    what the forward pass saved after that unit is already freed, so the peak is the largest
    (saved up to the unit + the unit's recomputed activations)."""

    def __init__(self, counter: _SavedBytes) -> None:
        self.counter = counter
        self.inputs: dict[int, int] = {}
        self.peak = 0    # bytes alive while the worst unit is recomputed
        self.inside = 0  # bytes the units would save without checkpointing

    def __call__(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        for key in ("use_reentrant", "preserve_rng_state", "determinism_check", "debug", "context_fn"):
            kwargs.pop(key, None)
        for a in args:
            if isinstance(a, torch.Tensor) and id(a) not in self.counter.params:
                self.inputs.setdefault(a.untyped_storage()._cdata, a.numel() * a.element_size())
                self.counter.keep.append(a)
        before, mark = self.counter.total, len(self.counter.seen)
        alive = before + sum(self.inputs.values())
        out = fn(*args, **kwargs)
        saved = self.counter.total - before
        self.counter.forget_since(mark)
        self.peak = max(self.peak, alive + saved)
        self.inside += saved
        return out


_LOW_PRECISION_OPS = ("linear", "conv1d", "conv2d", "conv_transpose2d", "matmul", "bmm", "baddbmm", "addmm")
_FP32_OPS = ("group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "exp", "pow", "norm")


class _CudaAutocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast's casting rules on the meta device (which has no autocast of its own):
    matrix products and convolutions run in the low precision, normalisations and softmax in
    fp32, so the trace saves the same copies a real mixed-precision step does."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        import torch.nn.functional as F

        self.dtype = dtype
        self.low = {f for name in _LOW_PRECISION_OPS for f in (getattr(F, name, None), getattr(torch, name, None)) if f}
        self.fp32 = {f for name in _FP32_OPS for f in (getattr(F, name, None), getattr(torch, name, None)) if f}
        self.fp32 |= {torch.Tensor.softmax, torch.Tensor.pow, torch.Tensor.exp}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        target = self.dtype if func in self.low else torch.float32 if func in self.fp32 else None
        if target is not None:
            def cast(x: Any) -> Any:
                return x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != target else x

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def build_lora_unet(arch: str, rank: int, dtype: torch.dtype, size: str = "full",
                    device: str = "meta") -> tuple[nn.Module, int]:
    """The ``size`` ("full" or "tiny") UNet of ``arch`` with the trainer's default LoRA targets
    injected (fp32 LoRA weights, the only trainable parameters), and its LoRA parameter count.
    On "meta" nothing is allocated (the estimate traces it); on another device the frozen
    weights are random, which does not change what a step allocates (the CPU check runs it)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from peft import LoraConfig, inject_adapter_in_model

    from lora_trainer.lora.targets import default_unet_targets
    from lora_trainer.models import tiny

    config = unet_config(arch) if size == "full" else tiny.unet_config(arch)
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about fp32 modules; the UNet has none
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    diffusers_logging.set_verbosity(level)
    if device != "meta":
        unet = unet.to_empty(device=device)
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.02)
            for b in unet.buffers():
                b.zero_()
    with torch.device(device):
        unet.requires_grad_(False)
        targets = default_unet_targets(unet)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), unet)
    lora_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # LoRA weights train in fp32, as the trainer keeps them
        p.requires_grad_("lora_" in n)
    return unet, lora_params


def meta_inputs(unet: nn.Module, resolution: int, batch: int, dtype: torch.dtype) -> dict[str, Any]:
    """The UNet's inputs for one step (latents, timesteps, text embeddings, SDXL's extras), on meta."""
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
def trace_activations(arch: str, resolution: int, rank: int, precision: str, size: str = "full") -> dict[str, int]:
    """Bytes saved for the backward pass at batch 1, traced as the trainer runs: weights in the
    precision's dtype, CUDA autocast rules for fp16/bf16, fp32 LoRA weights, diffusers'
    checkpointing units. Activation memory is linear in the batch size, so callers scale these.

    ``total``: everything saved without checkpointing (the peak is at the forward pass's end);
    ``checkpointed``: the peak with checkpointing: what stays saved (outside the units, plus each
    unit's inputs) at the forward pass's end, or while the worst unit is recomputed."""
    import torch.nn.functional as F
    import torch.utils.checkpoint as tuc

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    unet, lora_params = build_lora_unet(arch, rank, dtype, size)
    counter = _SavedBytes({id(p) for p in unet.parameters()})
    units = _CheckpointUnits(counter)
    unet.enable_gradient_checkpointing()  # the units call torch.utils.checkpoint.checkpoint: ours, below
    original_sdpa, original_ckpt = F.scaled_dot_product_attention, tuc.checkpoint
    F.scaled_dot_product_attention, tuc.checkpoint = _fused_attention, units
    autocast = _CudaAutocast(dtype) if precision in ("fp16", "bf16") else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t), autocast:
            unet.train()
            unet(**meta_inputs(unet, resolution, 1, dtype))
    finally:
        F.scaled_dot_product_attention, tuc.checkpoint = original_sdpa, original_ckpt
    outside = counter.total
    weights = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora_" not in n)
    return {"total": outside + units.inside,
            "checkpointed": max(outside + sum(units.inputs.values()), units.peak),
            "lora_params": lora_params, "weight_bytes": weights}


def estimate_peak_memory(arch: str, resolution: int, batch_size: int = 1, rank: int = 16,
                         precision: str = "bf16", gradient_checkpointing: bool = False,
                         cache_latents: bool = True, train_text_encoder: bool = False,
                         size: str = "full") -> MemoryEstimate:
    """Predicted peak accelerator memory (GiB figures) of a UNet LoRA training step."""
    act_dtype = precision if precision in ("fp16", "bf16") else "fp32"
    tr = trace_activations(arch, resolution, rank, act_dtype, size)
    weights = tr["weight_bytes"]
    if not cache_latents:
        weights += VAE_PARAMS * DTYPE_BYTES[act_dtype]
    if train_text_encoder or not cache_latents:
        weights += get_family(arch).text_encoder_params * DTYPE_BYTES[act_dtype]
    # LoRA: fp32 parameters and AdamW's two fp32 moments stay resident.
    lora = tr["lora_params"] * 4 * 3
    if gradient_checkpointing:
        activations = batch_size * tr["checkpointed"]
    else:
        activations = batch_size * tr["total"]
    # The step's peak is at the forward pass's end (activations, the model output, the target
    # and the loss gradient in fp32; no LoRA gradients yet; the backward pass frees activations
    # as fast as it makes gradients), or at the optimizer step (the fp32 LoRA gradients and as
    # much again in AdamW's temporaries), whichever is larger.
    side = resolution // 8
    forward_end = activations + batch_size * LATENT_CHANNELS * side * side * 4 * 3
    optimizer_step = tr["lora_params"] * 4 * 2
    transient = max(forward_end, optimizer_step) - activations
    total = weights + lora + activations + transient
    return MemoryEstimate(arch, resolution, batch_size, rank, precision, gradient_checkpointing, cache_latents,
                          weights / GiB, lora / GiB, activations / GiB, transient / GiB, total / GiB)


def choose_settings(free_gb: float, arch: str, reserve_gb: float = 1.5, resolution: int | None = None,
                    rank: int = 16, precision: str = "bf16", model_resident: bool = False) -> dict[str, Any]:
    """The fastest settings predicted to fit ``free_gb - reserve_gb``: the biggest batch without
    gradient checkpointing, else with it; resolution defaults to the family's native one.
    What a step allocates is given ``ACTIVATION_HEADROOM`` more room, for the allocator's
    fragmentation and the kernels' workspaces, which the estimate does not model.

    ``model_resident``: the UNet's weights are already in memory (a WebUI's loaded model), so
    they are not part of what must still fit."""
    res = resolution or get_family(arch).default_resolution
    budget = free_gb - reserve_gb
    if model_resident:
        budget += trace_activations(arch, res, rank, precision)["weight_bytes"] / GiB
    for checkpointing in (False, True):
        best = None
        for batch in (8, 6, 4, 3, 2, 1):
            est = estimate_peak_memory(arch, res, batch, rank, precision, checkpointing)
            if _needed_gb(est) <= budget:
                best = est
                break
        if best is not None:
            return {"batch_size": best.batch_size, "gradient_checkpointing": checkpointing,
                    "resolution": res, "rank": rank, "mixed_precision": precision,
                    "estimated_peak_gb": round(best.total_gb, 2), "fits": True}
    est = estimate_peak_memory(arch, res, 1, rank, precision, True)
    return {"batch_size": 1, "gradient_checkpointing": True, "resolution": res, "rank": rank,
            "mixed_precision": precision, "estimated_peak_gb": round(est.total_gb, 2),
            "fits": _needed_gb(est) <= budget and not math.isnan(est.total_gb)}


def _needed_gb(est: MemoryEstimate) -> float:
    return est.total_gb + ACTIVATION_HEADROOM * (est.activations_gb + est.transient_gb)
