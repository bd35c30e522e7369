"""A LoRA training step of a transformer denoiser (Flux.1, SD3.5) for the memory estimate and its
CPU check: the family's transformer with LoRA on its default targets, fed by the family's own
``predict`` (packing, ids, timestep scaling) with the conditioning its text encoders give.

Everything a family decides is asked of the family (:mod:`lora_trainer.families.base`); the same
code traces on ``meta`` (the estimate) and runs on the CPU (``bench.memcheck``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.bench.adapters import adapt_as_trainer, add_network, materialize
from lora_trainer.families import get_family

QUANTIZED = ("fp8", "nf4")


def build_lora_transformer(arch: str, variant: str, rank: int, dtype: torch.dtype, size: str = "full",
                           device: str = "meta", weight_dtype: str = "auto",
                           network: str = "lora", network_args: tuple = ()) -> tuple[nn.Module, int]:
    """The family's ``size`` transformer with fp32 ``network`` layers (:func:`add_network`) on
    its default targets, frozen weights in ``dtype`` or, with ``weight_dtype`` fp8 / nf4, its
    block Linear weights stored in fp8 and upcast per call (nf4 also dequantizes per call to the
    compute dtype: traced the same, its smaller storage is counted by the family's
    ``denoiser_weight_bytes``). Random weights off meta: a step allocates the same.
    ``network_args``: the run's network settings (``adapters.network_args``), placed by the
    trainer's own injection."""
    from lora_trainer.families.flow_parts import store_fp8

    family = get_family(arch)
    model = materialize(family.meta_denoiser(variant, size).to(dtype), device)
    model.requires_grad_(False)
    if weight_dtype in QUANTIZED:
        store_fp8(model, dtype)
    if network_args:
        return model, adapt_as_trainer(model, arch, rank, network, network_args, device)
    paths = family.default_targets(family.denoiser_root, model, "diffusers")
    lora_params = add_network(model, paths, rank, network, device)
    return model, lora_params


def step_call(model: nn.Module, arch: str, variant: str, resolution: int, batch: int, dtype: torch.dtype,
              device: str = "meta") -> Callable[[], torch.Tensor]:
    """``forward()``: makes a batch (noisy fp32 latents, as the trainer keeps them, sigmas, and the
    cached conditioning: context of the family's token count, pooled embedding) and runs the
    family's ``predict`` on it; returns the prediction (latent-shaped)."""
    family = get_family(arch)
    cfg = model.config
    predict = family.make_predict(model, dtype)
    side = resolution // 8
    tokens = family.text_tokens(variant)
    guidance = family.objective.guidance_input

    def forward() -> Any:
        latents = torch.randn(batch, family.latent_channels, side, side, device=device)
        cond = {"context": torch.randn(batch, tokens, cfg.joint_attention_dim, device=device, dtype=dtype),
                "pooled": torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype)}
        if guidance:
            cond["guidance"] = torch.full((batch,), family.objective.train_guidance, device=device)
        return predict(latents, torch.rand(batch, device=device), cond)

    return forward
