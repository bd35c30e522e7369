"""The tiny Stable Diffusion models (embedded demo, tests, CPU benchmarks): real topology, small widths.

SD1/SD2: 4 levels, 2 res blocks per level, attention at the first three; SDXL: 3 levels,
attention at the last two. Only the widths shrink, so every module name (and so every LoRA key)
matches the full-size model's and the WebUI's key converter maps them to the right layers.
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32)


def unet_config_sd(v2: bool) -> dict[str, Any]:
    return {
        **_COMMON,
        "block_out_channels": (32, 64, 128, 128),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4, 8, 8) if v2 else 8,
        "use_linear_projection": v2,
    }


def unet_config_sdxl() -> dict[str, Any]:
    return {
        **_COMMON,
        "block_out_channels": (32, 64, 128),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 1, 2),
        "cross_attention_dim": 64,  # te1 (32) + te2 (32) hidden states, concatenated
        "attention_head_dim": (2, 4, 8),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # time ids + te2 pooled
    }


def vae_config(scaling_factor: float) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 64, 64), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling_factor,
    )


def components(family: Any, seed: int, prediction_type: str,
               encoder_kinds: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Randomly initialised diffusers parts of ``family``'s tiny model, frozen, in eval mode.

    ``encoder_kinds``: {text encoder subfolder: (transformers class, activation)}; OpenAI's CLIP-L
    uses quick_gelu, OpenCLIP gelu."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from lora_trainer.models.tiny import SCHEDULER_KWARGS, text_config
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**family.tiny_unet_config()),
        "vae": AutoencoderKL(**family.tiny_vae_config()),
        "scheduler": DDPMScheduler(**SCHEDULER_KWARGS, prediction_type=prediction_type),
    }
    pads = dict(family.tokenizer_pads)
    for _, te_folder, tok_folder in family.text_encoder_folders:
        cls, act = encoder_kinds[te_folder]
        parts[te_folder] = getattr(transformers, cls)(transformers.CLIPTextConfig(**text_config(act)))
        parts[tok_folder] = load_clip_tokenizer(pad_token=pads[tok_folder])
    for name in ("unet", "vae", *(te for _, te, _ in family.text_encoder_folders)):
        parts[name].eval().requires_grad_(False)
    return parts
