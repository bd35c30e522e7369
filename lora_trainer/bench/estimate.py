"""Pre-flight memory estimate: predicted peak accelerator memory of a LoRA training run.

No rule of thumb: the models are built on PyTorch's ``meta`` device (no memory is allocated)
and the run's two memory-heavy phases are executed there the way the trainer runs them, with
an allocator simulated by :class:`~lora_trainer.bench.livemem.LiveBytes` (every tensor counted
from the op that makes it until its last reference goes):

- the model's load: the text encoders and the VAE (the standalone app puts the denoiser on the
  card once the caches are filled; a WebUI's model is already resident);
- the text embeddings' caching: the text encoders alone (the trainer parks the denoiser and the
  VAE off the card meanwhile, and the encoders leave it before those come back);
- the latent caching: the VAE encodes one image while the VAE (and text encoders that are
  trained, so not cached) are resident; the denoiser is still parked, the VAE leaves afterwards;
- a training step with LoRA layers injected: forward, loss and backward, with the frozen weights
  in the training dtype, CUDA autocast's casting rules, fp32 LoRA weights, attention as a fused
  kernel allocates it (not the score matrix) and the trainer's gradient checkpointing of all or
  a share of the blocks (train/checkpointing.py), so the backward's recomputation, the gradients
  so far and the temporaries are all counted as they happen; the UNet weights, LoRA parameters
  and the optimizer's state are resident.

A run set by hand is traced with all of its network settings (block and conv ranks, targets,
LoKr factor, dropouts, trained text encoders) by the trainer's own injection, its caption
length and its optimizer (train/memory_check.py).

The peak is the largest of them. It predicts what ``torch.cuda.max_memory_allocated``
reports (the CUDA context itself is not included); :mod:`lora_trainer.bench.memcheck` measures
a real step on a CPU, and ``bench/gpu_rows.sh`` the whole run on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lora_trainer.bench import trace_cache
from lora_trainer.bench.adapters import NetworkArgs, TextEncoders
from lora_trainer.bench.livemem import LiveBytes
from lora_trainer.config import NETWORK_TYPE_HELP
from lora_trainer.data.cache import LATENT_CACHE_BATCH
from lora_trainer.families import get_family
from lora_trainer.torch_compat import autocast_dtype, meta_autocast, meta_checkpointing
from lora_trainer.train.checkpointing import SHARES

GiB = 1024**3
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Text encoders and VAE parameter counts (full size), resident only when not cached/offloaded.
LATENT_CHANNELS = 4
# Extra room choose_settings leaves on top of the predicted activations: the CUDA caching
# allocator's fragmentation and cuDNN/cuBLAS workspaces are not part of the estimate.
ACTIVATION_HEADROOM = 0.25
# cuDNN's convolution workspace, in units of the convolution's largest tensor, counted while it
# runs on CUDA. Not derivable on meta: cuDNN picks algorithms by the memory it finds free. Set so
# that the H200's measured peaks of the runs the latent caching dominates (SD1.5 and SDXL with
# checkpointing) are covered (docs/PERFORMANCE.md); the GPU rows script measures it again.
CUDNN_WORKSPACE = 3.0


NETWORK_TYPES = tuple(NETWORK_TYPE_HELP)  # network.type's choices
# Bytes of optimizer state per fp32 adapter parameter (optim.optimizer): AdamW's two fp32 moments;
# 8-bit AdamW's two byte-sized ones, with room for the small tensors bitsandbytes keeps in fp32;
# Prodigy's two moments, its s and the initial weights; Lion's one moment; Adafactor's factored
# second moment, counted as a whole one for the 1-D tensors it cannot factor.
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 4, "prodigy": 16, "lion": 4, "adafactor": 4}


@dataclass
class MemoryEstimate:
    arch: str
    resolution: int
    batch_size: int
    rank: int
    precision: str
    gradient_checkpointing: bool
    cache_latents: bool
    weights_gb: float  # frozen weights resident while training
    lora_gb: float  # LoRA parameters and the optimizer's state
    step_gb: float  # the most a training step allocates beyond those
    encode_gb: float  # the most the VAE allocates while encoding an image for the latent cache
    caching_gb: float  # peak of the latent caching: the VAE (and trained text encoders) + encode_gb
    total_gb: float  # the largest of training (weights + lora + step), load, caching and text_caching
    # the text embeddings' caching: the text encoders' weights alone (denoiser and VAE parked)
    text_caching_gb: float = 0.0
    variant: str = ""  # the family's variant ("dev", "large"; "" for families without)
    weight_dtype: str = "auto"  # storage of the denoiser's weights (model.weight_dtype)
    network: str = "lora"  # the adapter kind (network.type)
    weights_cast: str = ""  # "bf16 -> fp32": a host stores the UNet narrow and casts per call (WeightsCast)
    load_gb: float = 0.0  # the model as loaded: text encoders and VAE (the denoiser comes after the caches)
    checkpointing_share: float = 0.0  # the share of the denoiser's blocks checkpointed (0: off)
    fp32_norms: bool = False  # GroupNorm / LayerNorm in fp32 under mixed precision (train.fp32_norms)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# (storage, computation) dtype names of a UNet whose frozen weights a host stores in the first and
# casts to the second in every layer at every call (Forge's manual cast, when it stores weights
# narrower than it computes: bf16 storage with fp32 computation, ...). Autograd keeps each
# layer's cast copy for the backward pass: without gradient checkpointing, all of them at once.
WeightsCast = tuple[str, str]


def unet_config(arch: str) -> dict[str, Any]:
    """Full-size UNet config shipped with the package (the single-file loader uses the same files)."""
    from lora_trainer.models.checkpoint import CONFIGS_DIR

    cfg = json.loads((CONFIGS_DIR / arch / "unet" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _fused_attention(sdpa: Any, *args: Any, **kw: Any) -> Any:
    """Stand-in for SDPA while tracing: a fused kernel's memory, not the full score matrix. Real
    tensors (another thread training while this one estimates) go to the real ``sdpa``. Takes
    q, k, v by position or (diffusers' attention dispatch) as query, key, value."""
    named = [kw.get(name) for name in ("query", "key", "value")[len(args):]]
    q, k, v = (*args[:3], *named)
    if q.device.type != "meta":
        return sdpa(*args, **kw)
    return _FusedAttn.apply(q, k, v)


class _FusedAttn(torch.autograd.Function):
    """Saves what flash / memory-efficient attention saves (inputs, output, fp32 log-sum-exp);
    its backward allocates the three input gradients and an fp32 accumulator for dq."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # meta tracing only
        q, k, v, _, _ = ctx.saved_tensors
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        accumulator = torch.empty_like(q, dtype=torch.float32)  # alive with the grads, freed on return
        del accumulator
        return grads


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

    def __enter__(self) -> Any:
        # what autocast_dtype("meta") says while this runs: code that asks (the norms' forward)
        # sees autocast on, and switches it off for a call with autocast_off("meta")
        self._said = meta_autocast(self.dtype)
        self._said.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return super().__exit__(*exc)
        finally:
            self._said.__exit__(None, None, None)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if autocast_dtype("meta") is None:  # switched off for this call
            return func(*args, **kwargs)
        target = self.dtype if func in self.low else torch.float32 if func in self.fp32 else None
        if target is not None:
            def cast(x: Any) -> Any:
                return x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != target else x

            args = tuple(cast(a) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _MetaFills(torch.overrides.TorchFunctionMode):
    """``torch.full`` with a 0-d tensor as its value, on meta, as an empty tensor of that size: a
    meta tensor has no value to read (transformers before 4.35 builds CLIP's causal mask so);
    what it allocates is the same."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        fill = args[1] if len(args) > 1 else kwargs.get("fill_value")
        if func is torch.full and isinstance(fill, torch.Tensor) and fill.is_meta:
            return torch.empty(args[0] if args else kwargs["size"], device="meta",
                               dtype=kwargs.get("dtype") or torch.get_default_dtype())
        return func(*args, **kwargs)


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """.to(dtype) warns about modules to keep in fp32; these models have none."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def build_lora_unet(arch: str, rank: int, dtype: torch.dtype, size: str = "full",
                    device: str = "meta", targets: str = "kohya", network: str = "lora",
                    network_args: NetworkArgs = (), text_encoders: TextEncoders = ()) -> tuple[nn.Module, int]:
    """The ``size`` ("full" or "tiny") UNet of ``arch`` with ``network`` layers (lora, locon,
    dora, loha, lokr; fp32, the only trainable parameters) on ``targets`` ("kohya": the trainer's
    defaults, plus the ResNet blocks' and samplers' layers for locon; "attention": the attention
    projections the reference loop trains), and their parameter count. ``network_args``: more of
    the run's network settings (:func:`network_args`), with which the trainer's own injection
    places the layers (its targets, block ranks, conv ranks, LoKr factor, dropouts, and on
    ``text_encoders`` when those are trained). On "meta" nothing is allocated (the estimate
    traces it); on another device the frozen weights are random, which does not change what a
    step allocates (the CPU check runs it)."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.bench.adapters import adapt_as_trainer, add_network, materialize
    from lora_trainer.bench.reference import REFERENCE_TARGETS
    from lora_trainer.lora.targets import conv_block_targets, default_unet_targets, find_targets
    from lora_trainer.models import tiny

    config = unet_config(arch) if size == "full" else tiny.unet_config(arch)
    with _quiet_diffusers(), torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config).to(dtype)
    unet = materialize(unet, device)
    unet.requires_grad_(False)
    if network_args:
        return unet, adapt_as_trainer(unet, arch, rank, network, network_args, device, text_encoders)
    paths = (default_unet_targets(unet) if targets == "kohya"
             else find_targets({"unet": (unet, "diffusers")}, list(REFERENCE_TARGETS))["unet"])
    if network == "locon":
        paths = sorted(dict.fromkeys(paths + conv_block_targets(unet)))
    return unet, add_network(unet, paths, rank, network, device)


def _cast_per_call_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The layer's own arithmetic with its stored weight and bias cast to the input's dtype (and
    device) first, as Forge's operations do when ``parameters_manual_cast`` is set."""
    import torch.nn.functional as F

    w = self.weight.to(x.device, x.dtype) if self.weight is not None else None
    b = self.bias.to(x.device, x.dtype) if getattr(self, "bias", None) is not None else None
    if isinstance(self, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(self, nn.GroupNorm):
        return F.group_norm(x, self.num_groups, w, b, self.eps)
    if isinstance(self, nn.LayerNorm):
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
    return self._conv_forward(x, w, b)


@functools.cache
def _cast_per_call_class(base: type) -> type:
    return type(f"CastPerCall{base.__name__}", (base,), {"forward": _cast_per_call_forward})


def store_cast_per_call(model: nn.Module, storage: torch.dtype, recast: bool = False,
                        checkpointing_share: float = 0.0) -> int:
    """Store the frozen weights of ``model``'s Linear, Conv2d and normalisation layers in ``storage``
    and make those layers cast them to their input's dtype at every call (a host's manual cast);
    the trainable (LoRA) layers are left as they are. ``recast``: as a run trains them outside
    the blocks it checkpoints (``checkpointing_share``), casting again in the backward pass
    instead of keeping each copy (train/recast.py). Returns how many layers."""
    from lora_trainer.train.checkpointing import outside_checkpointed
    from lora_trainer.train.recast import recast_in_backward

    layers = [m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
              and not any(p.requires_grad for p in m.parameters())]
    for layer in layers:
        for name, p in list(layer.named_parameters(recurse=False)):
            setattr(layer, name, nn.Parameter(p.detach().to(storage), requires_grad=False))
        layer.__class__ = _cast_per_call_class(type(layer))
    if recast:
        recast_in_backward(outside_checkpointed(model, checkpointing_share, layers))
    return len(layers)


def meta_inputs(unet: nn.Module, resolution: int, batch: int, dtype: torch.dtype, token_chunks: int = 1) -> dict[str, Any]:
    """The UNet's inputs for one step (latents, timesteps, text embeddings of ``token_chunks``
    chunks of 77 tokens, as long captions are read: ``data.max_token_length``; SDXL's extras), on meta."""
    cfg = unet.config
    side = resolution // 8
    kw: dict[str, Any] = {
        "sample": torch.empty(batch, LATENT_CHANNELS, side, side, device="meta", dtype=dtype),
        "timestep": torch.zeros(batch, device="meta", dtype=torch.long),
        "encoder_hidden_states": torch.empty(batch, 77 * token_chunks, cfg.cross_attention_dim, device="meta", dtype=dtype),
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {
            "text_embeds": torch.empty(batch, pooled, device="meta", dtype=dtype),
            "time_ids": torch.empty(batch, 6, device="meta", dtype=dtype),
        }
    return kw


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@contextlib.contextmanager
def _tracing(precision: str, device: str) -> Iterator[LiveBytes]:
    """Count live bytes on meta with SDPA as a fused kernel and CUDA autocast's casting rules
    (``device`` "cuda": with convolution workspaces)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = functools.partial(_fused_attention, original)
    live = LiveBytes(conv_workspace=CUDNN_WORKSPACE if device == "cuda" else 0.0)
    autocast = _CudaAutocast(_DTYPES[precision]) if precision != "fp32" else contextlib.nullcontext()
    try:
        with _MetaFills(), autocast, live:
            yield live
    finally:
        F.scaled_dot_product_attention = original


def _lora_step(arch: str, resolution: int, batch: int, rank: int, dtype: torch.dtype, size: str, targets: str,
               variant: str, weight_dtype: str, network: str = "lora",
               weights_cast: WeightsCast | None = None, share: float = 0.0, network_args: NetworkArgs = (),
               token_chunks: int = 1) -> tuple[nn.Module, int, Any]:
    """(denoiser with LoRA, its LoRA parameter count, forward()) on meta; forward makes the
    step's inputs and returns the prediction. ``weights_cast``: the UNet's frozen weights stored
    in its first dtype and cast per call, its inputs in the second (the host's computation), cast
    again in the backward pass outside the blocks checkpointed (``share`` of them);
    ``network_args``: the run's network settings (:func:`network_args`); ``token_chunks``: a
    UNet's captions of that many chunks of 77 tokens (the transformer families read their own)."""
    if get_family(arch).transformer_denoiser:
        from lora_trainer.bench.transformer_step import build_lora_transformer, step_call

        model, lora_params = build_lora_transformer(arch, variant, rank, dtype, size, weight_dtype=weight_dtype,
                                                    network=network, network_args=network_args)
        return model, lora_params, step_call(model, arch, variant, resolution, batch, dtype)
    from lora_trainer.bench.adapters import text_conditioning, trained_text_encoders

    text = trained_text_encoders(arch, size, dtype, network_args)
    unet, lora_params = build_lora_unet(arch, rank, dtype, size, targets=targets, network=network,
                                        network_args=network_args, text_encoders=text)
    if weights_cast is not None:
        store_cast_per_call(unet, _DTYPES[weights_cast[0]], True, share)
        dtype = _DTYPES[weights_cast[1]]

    def forward() -> torch.Tensor:
        inputs = meta_inputs(unet, resolution, batch, dtype, token_chunks)
        if text:
            inputs["encoder_hidden_states"] = text_conditioning(text, batch, token_chunks, "meta")
        return unet(**inputs).sample

    return unet, lora_params, forward


def _weight_bytes(arch: str, model: nn.Module, size: str, variant: str, weight_dtype: str, precision: str) -> int:
    """The frozen denoiser's bytes as stored: the family's figure for a full-size transformer (fp8
    and nf4 storage), else the traced model's."""
    family = get_family(arch)
    if family.transformer_denoiser and size == "full":
        return family.denoiser_weight_bytes(variant, weight_dtype if weight_dtype in ("fp8", "nf4") else precision)
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)  # not the adapters


@functools.lru_cache(maxsize=64)
@trace_cache.on_disk
def trace_step(arch: str, resolution: int, batch: int, rank: int, precision: str, checkpointing: float,
               size: str = "full", targets: str = "kohya", device: str = "cuda", variant: str = "",
               weight_dtype: str = "auto", network: str = "lora",
               weights_cast: WeightsCast | None = None, fp32_norms: bool = False,
               count_ops: bool = False, network_args: NetworkArgs = (), token_chunks: int = 1) -> dict[str, int]:
    """One training step run on meta as the trainer runs it (frozen weights in the precision's
    dtype, CUDA autocast's rules, fp32 LoRA weights, the trainer's checkpointing of the share
    ``checkpointing`` of the denoiser's blocks, 0 for none): ``step`` is the
    most it allocates beyond the resident weights, LoRA and optimizer state at any moment of the
    forward and backward passes (a checkpointed backward holds the LoRA gradients so far, the
    inputs of the units still to go, one unit's recomputed activations and its backward's
    temporaries; all of that is counted as it happens, not modelled). ``weights_cast``: the
    frozen weights stored narrow and cast in each layer at every call; outside the checkpointed
    blocks each layer casts again in the backward pass (train/recast.py), inside them the copies
    a recomputed block keeps are counted as they happen. The norms compute in the autocast dtype
    as the trainer's do (train/norms.py), unless ``fp32_norms`` (``train.fp32_norms``).
    ``count_ops``: also ``computing_ops`` and ``casts``, what the step dispatches (the launches and
    dtype copies CUDA would run under autocast; the LoRA layers as peft runs them).
    ``network_args``: the run's network settings beyond its type and rank (:func:`network_args`:
    targets, block and conv ranks, LoKr factor, dropouts, trained text encoders), placed by the
    trainer's own injection; ``token_chunks``: captions of that many chunks of 77 tokens."""
    import torch.nn.functional as F
    import torch.utils.checkpoint as tuc

    from lora_trainer.bench.opcount import OpCounter
    from lora_trainer.train import checkpointing as ckpt
    from lora_trainer.train.norms import norms_in_compute_dtype

    dtype = _DTYPES[precision]
    unet, lora_params, forward = _lora_step(arch, resolution, batch, rank, dtype, size, targets, variant,
                                            weight_dtype, network, weights_cast, share=checkpointing,
                                            network_args=network_args, token_chunks=token_chunks)
    if checkpointing:
        # The recomputation runs inside the backward pass, where this thread's autocast
        # stand-in is not active: the checkpoint enters one of its own.
        def recompute_autocast() -> tuple[Any, Any]:
            return contextlib.nullcontext(), (_CudaAutocast(dtype) if precision != "fp32" else contextlib.nullcontext())

        ckpt.checkpoint(unet, checkpointing, functools.partial(
            tuc.checkpoint, use_reentrant=False, preserve_rng_state=False, context_fn=recompute_autocast))
    if not fp32_norms:
        norms_in_compute_dtype(unet)
    unet.train()
    side = resolution // 8
    counter = OpCounter() if count_ops else contextlib.nullcontext()
    with _tracing(precision, device) as live, meta_checkpointing(), counter:
        latents = torch.empty(batch, get_family(arch).latent_channels, side, side, device="meta")  # fp32, as kept
        noise = torch.empty_like(latents)  # the trainer's noise and target: as large again
        pred = forward()
        F.mse_loss(pred.float(), noise).backward()
        del pred
        after_backward = live.current  # the LoRA gradients and the batch
    weights = _weight_bytes(arch, unet, size, variant, weight_dtype, precision)
    # The trainer keeps the LoRA weights' low-precision copy (train/speed.py) through the backward
    # pass, where the recomputation of checkpointed blocks uses it: peft here casts per layer.
    kept_copy = lora_params * dtype.itemsize if checkpointing and precision != "fp32" else 0
    # The optimizer step then adds as much again as the fp32 gradients in temporaries, at most.
    out = {"step": max(live.peak + kept_copy, after_backward + lora_params * 4), "lora_params": lora_params,
           "weight_bytes": weights}
    if isinstance(counter, OpCounter):
        out |= {"computing_ops": counter.computing, "casts": counter.casts}
    return out


def vae_config(arch: str, size: str) -> dict[str, Any]:
    """The VAE config of ``arch`` (full size: the packaged one; else the tiny one)."""
    from lora_trainer.models import tiny

    if size != "full":
        return tiny.vae_config(arch)
    folder = get_family(arch).config_folder()
    cfg = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


@functools.lru_cache(maxsize=64)
@trace_cache.on_disk
def trace_latent_caching(arch: str, resolution: int, batch: int, precision: str, size: str = "full",
                         device: str = "cuda") -> dict[str, int]:
    """The VAE encoding a batch of images on meta, as the latent cache does before training:
    ``encode``: the most it allocates at once; ``vae_bytes``: the VAE's weights (fp32 for SDXL,
    whose VAE overflows in fp16, else the precision's dtype)."""
    from diffusers import AutoencoderKL

    dtype = _DTYPES[precision]
    vae_dtype = torch.float32 if get_family(arch).vae_fp32 else dtype
    with _quiet_diffusers(), torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_config(arch, size)).to(vae_dtype)
    vae.requires_grad_(False)
    with _tracing("fp32", device) as live, torch.no_grad():
        pixels = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=dtype)
        latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample()
        del pixels
        latents = (latents * vae.config.scaling_factor).to(dtype)
    return {"encode": live.peak, "vae_bytes": sum(p.numel() * p.element_size() for p in vae.parameters())}


def estimate_peak_memory(arch: str, resolution: int, batch_size: int = 1, rank: int = 16,
                         precision: str = "bf16", gradient_checkpointing: bool = False,
                         cache_latents: bool = True, train_text_encoder: bool = False,
                         size: str = "full", targets: str = "kohya", device: str = "cuda",
                         unet_parked: bool = True, variant: str = "", weight_dtype: str = "auto",
                         network: str = "lora", weights_cast: WeightsCast | None = None,
                         checkpointing_share: float = 1.0, fp32_norms: bool = False,
                         network_args: NetworkArgs = (), token_chunks: int = 1,
                         text_cached: bool = True, optimizer: str = "adamw") -> MemoryEstimate:
    """Predicted peak accelerator memory (GiB figures) of a LoRA training run: the largest of
    the model's load (text encoders and VAE; the denoiser is placed once the caches are filled),
    the text embeddings' caching (the text encoders alone: the denoiser and the VAE are parked;
    the encoders' own activations, a few captions at a time, are not counted), the latent
    caching (the VAE while it encodes an image, with text encoders that are trained, hence
    not cached) and a training step (denoiser, LoRA and optimizer state resident; the step's own
    allocations). Captions are assumed fixed, so their embeddings are cached unless trained.

    ``unet_parked=False`` counts the trainer as it was before it parked the denoiser: the whole
    model loaded at once and resident while latents, then captions were cached (the runs the
    H200 measured). ``variant``: the family's variant ("dev", "large"; default its first);
    ``weight_dtype``: the denoiser's storage (``model.weight_dtype``: "auto" is the precision's
    dtype; fp8 / nf4 for the families that offer them, which also store T5 in fp8); ``network``:
    the adapter kind (``network.type``: lora, locon, dora, loha, lokr), traced as the trainer
    builds it; ``weights_cast``: a host's UNet stored narrower than it computes, cast per call
    (see ``WeightsCast``); ``checkpointing_share``: with gradient checkpointing, the share of the
    denoiser's blocks it recomputes (``train.checkpointing_share``); ``fp32_norms``: the norms
    in fp32 under mixed precision, autocast's own rule (``train.fp32_norms``); ``network_args``:
    the run's other network settings (:func:`network_args`); ``token_chunks``: captions of that
    many chunks of 77 tokens (``data.max_token_length``); ``text_cached=False``: captions that
    change from step to step (shuffled, tags dropped) or ``data.cache_text_embeddings`` off, so
    the text encoders stay and encode each step's captions; ``optimizer``: ``optim.optimizer``,
    whose state per adapter parameter is :data:`OPTIMIZER_STATE_BYTES`."""
    family = _checked(arch, variant, weight_dtype, network, weights_cast)
    variant = variant or family.default_variant()
    prec = precision if precision in ("fp16", "bf16") else "fp32"
    share = float(checkpointing_share) if gradient_checkpointing else 0.0
    tr = trace_step(arch, resolution, batch_size, rank, prec, share, size, targets, device,
                    variant, weight_dtype, network, weights_cast, fp32_norms,
                    network_args=network_args, token_chunks=token_chunks)
    cache = trace_latent_caching(arch, resolution, LATENT_CACHE_BATCH, prec, size, device)
    text = family.text_encoder_bytes(weight_dtype, DTYPE_BYTES[prec]) if size == "full" else 0
    denoiser, vae = tr["weight_bytes"], cache["vae_bytes"]
    weights = denoiser
    text_stays = train_text_encoder or not text_cached  # else the captions' embeddings are cached and
    if text_stays:  # the encoders leave
        weights += text
    step = tr["step"]
    if not cache_latents:
        # The VAE stays and encodes each step's batch before the denoiser runs: the encoding's
        # memory is free again (all but the latents) when the denoiser's step begins.
        weights += vae
        per_step = cache if batch_size == LATENT_CACHE_BATCH else trace_latent_caching(
            arch, resolution, batch_size, prec, size, device)
        step = max(step, per_step["encode"])
    lora = tr["lora_params"] * (4 + OPTIMIZER_STATE_BYTES[optimizer])  # fp32 parameters and the optimizer's state
    resident = 0 if unet_parked else denoiser  # the denoiser beside the encoders
    text_resident = text if text_stays or not unet_parked else 0  # encoders beside the VAE
    caching = vae + cache["encode"] + text_resident + resident if cache_latents else 0
    text_caching = 0 if text_stays else text + resident
    load = text + vae + resident
    return MemoryEstimate(arch, resolution, batch_size, rank, precision, gradient_checkpointing, cache_latents,
                          weights / GiB, lora / GiB, step / GiB, cache["encode"] / GiB, caching / GiB,
                          max(weights + lora + step, caching, text_caching, load) / GiB, text_caching / GiB,
                          variant, weight_dtype, network, " -> ".join(weights_cast) if weights_cast else "",
                          load / GiB, share, fp32_norms)


def _checked(arch: str, variant: str, weight_dtype: str, network: str = "lora",
             weights_cast: WeightsCast | None = None) -> Any:
    """The family of ``arch``; a one-line error for a variant, a weight storage, a network type or
    a cast per call it does not have."""
    from lora_trainer.errors import ConfigError

    if network not in NETWORK_TYPES:
        raise ConfigError(f"network.type {network!r}: use one of {', '.join(NETWORK_TYPES)}")
    family = get_family(arch)
    if weights_cast is not None and (family.transformer_denoiser or not set(weights_cast) <= set(_DTYPES)):
        raise ConfigError(f"weights stored as {weights_cast[0]} and computed in {weights_cast[1]}: estimated for "
                          f"UNet families in {', '.join(_DTYPES)} only, not {family.label}")
    if variant and variant not in family.variants():
        known = ", ".join(family.variants()) or "none"
        raise ConfigError(f"variant {variant!r}: {family.label} has the variants {known}")
    if weight_dtype != "auto" and weight_dtype not in family.quantized_weights:
        raise ConfigError(f"model.weight_dtype {weight_dtype!r}: {family.label} weights are stored in the compute "
                          "dtype; use auto")
    return family


def _storages(arch: str) -> tuple[str, ...]:
    """The denoiser storages to try, best first: the compute dtype, then the family's quantized ones."""
    return ("auto", *get_family(arch).quantized_weights)


def choose_settings(free_gb: float, arch: str, reserve_gb: float = 1.5, resolution: int | None = None,
                    rank: int = 16, precision: str = "bf16", model_resident: bool = False,
                    variant: str = "", network: str = "lora",
                    weights_cast: WeightsCast | None = None, cache_latents: bool = True,
                    extras: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fastest settings predicted to fit ``free_gb - reserve_gb``: the least recomputation
    first — no gradient checkpointing, else the smallest share of the denoiser's blocks
    checkpointed (:data:`~lora_trainer.train.checkpointing.SHARES`) with which one image fits —
    then the biggest batch with it; the denoiser's weights in the compute dtype, else (Flux.1 /
    SD3.5) stored in fp8, else nf4; resolution defaults to the family's native one.
    Recomputation before batch: each block checkpointed costs its forward again for every image,
    while a bigger batch only spreads the per-step overhead, which is small next to a step at a
    family's native resolution.
    A storage whose weights, adapter or caching alone leave no room is left after its first
    estimate (those do not depend on the share or the batch).
    What a step (or the VAE) allocates is given ``ACTIVATION_HEADROOM`` more room, for the
    allocator's fragmentation and the kernels' workspaces, which the estimate does not model.

    ``model_resident``: the model (UNet, text encoders, VAE) is already in memory (a WebUI's
    loaded model), so its weights are not part of what must still fit. ``weights_cast``: the
    host stores the UNet narrower than it computes and casts per call (see ``WeightsCast``).
    ``cache_latents=False``: the images are encoded at every step (random crops, color
    augmentation), so the VAE and its encoding are part of the step. ``extras``: more of the run's
    settings, as :func:`estimate_peak_memory` takes them (``memory_check.shaping``: the network's
    other settings, the caption length, the optimizer, ...)."""
    res = resolution or get_family(arch).default_resolution
    budget = free_gb - reserve_gb
    extras = extras or {}
    if model_resident:  # the UNet, the text encoders and the VAE are already counted as used
        one = estimate_peak_memory(arch, res, 1, rank, precision, variant=variant, network=network,
                                   weights_cast=weights_cast, **extras)
        budget += one.weights_gb + one.load_gb
    for storage in _storages(arch):
        for share in SHARES:
            best = None
            for batch in (1, 2, 3, 4, 6, 8):  # a batch that does not fit ends the search: larger ones need more
                est = estimate_peak_memory(arch, res, batch, rank, precision, share > 0, variant=variant,
                                           weight_dtype=storage, network=network, weights_cast=weights_cast,
                                           checkpointing_share=share or 1.0, cache_latents=cache_latents, **extras)
                if needed_gb(est) > budget:
                    break
                best = est
            if best is not None:
                return _choice(best, True)
            if _fixed_gb(est) > budget:  # no share or batch fits with this storage: the next one
                break
    est = estimate_peak_memory(arch, res, 1, rank, precision, True, variant=variant, weight_dtype=_storages(arch)[-1],
                               network=network, weights_cast=weights_cast, cache_latents=cache_latents, **extras)
    return _choice(est, needed_gb(est) <= budget and not math.isnan(est.total_gb))


def _choice(est: MemoryEstimate, fits: bool) -> dict[str, Any]:
    return {"batch_size": est.batch_size, "gradient_checkpointing": est.gradient_checkpointing,
            "checkpointing_share": est.checkpointing_share or 1.0,
            "resolution": est.resolution, "rank": est.rank, "mixed_precision": est.precision,
            "weight_dtype": est.weight_dtype, "estimated_peak_gb": round_up(est.total_gb, 2), "fits": fits}


def round_up(gb: float, digits: int) -> float:
    """``gb`` rounded up to ``digits`` decimals, so a figure shown never says less than the
    estimate (a figure already at those decimals stays: 8.7 is not 8.8 for binary noise)."""
    return gb if math.isnan(gb) else math.ceil(round(gb * 10**digits, 6)) / 10**digits


def needed_gb(est: MemoryEstimate) -> float:
    return max(est.weights_gb + est.lora_gb + est.step_gb * (1 + ACTIVATION_HEADROOM), _fixed_gb(est))


def _fixed_gb(est: MemoryEstimate) -> float:
    """What :func:`needed_gb` asks whatever the share checkpointed and the batch: the weights with
    the adapter and its optimizer state, and the caching and loading before the loop."""
    return max(est.weights_gb + est.lora_gb, est.caching_gb + ACTIVATION_HEADROOM * est.encode_gb,
               est.text_caching_gb, est.load_gb)


def fits_resident(est: MemoryEstimate, free_gb: float, reserve_gb: float = 1.5) -> bool:
    """Whether the run of ``est`` fits ``free_gb - reserve_gb`` when its denoiser already sits in
    memory (a WebUI's model, lent in place): its weights are not part of what must still fit."""
    return needed_gb(est) - est.weights_gb <= free_gb - reserve_gb
