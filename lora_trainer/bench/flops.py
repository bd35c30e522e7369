"""FLOP count of a UNet forward pass, traced on the meta device (nothing is allocated or run)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_forward_flops(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                        context: torch.Tensor, added_cond: dict[str, torch.Tensor] | None = None) -> int:
    """FLOPs of one forward pass of ``unet`` on these inputs (any device, meta included)."""
    kwargs = {"added_cond_kwargs": added_cond} if added_cond else {}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, timestep, context, **kwargs)
    return int(counter.get_total_flops())


@functools.lru_cache(maxsize=32)
def unet_forward_flops(arch: str, resolution: int, batch: int = 1, size: str = "full") -> int:
    """FLOPs of one forward pass of the ``size`` ("full" or "tiny") UNet of ``arch``."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.bench.estimate import unet_config
    from lora_trainer.models import tiny

    config = unet_config(arch) if size == "full" else tiny.unet_config(arch)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        side = resolution // 8
        cfg = unet.config
        added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            added = {"text_embeds": torch.empty(batch, pooled), "time_ids": torch.empty(batch, 6)}
        return count_forward_flops(unet, torch.empty(batch, 4, side, side), torch.zeros(batch, dtype=torch.long),
                                   torch.empty(batch, 77, cfg.cross_attention_dim), added)


def training_step_flops(forward_flops: int, gradient_checkpointing: bool = False) -> int:
    """Model FLOPs of a LoRA step with a frozen base: forward + input-gradient backward (≈ 2×
    forward), one more forward when activations are recomputed. LoRA's own weight gradients are
    negligible at ranks ≤ 128."""
    return forward_flops * (3 if gradient_checkpointing else 2)
