"""Tiny Stable Diffusion models built from config: the embedded demo model, tests, CPU benchmarks.

They keep each family's real topology — SD1/SD2: 4 levels, 2 res blocks per level, attention at
the first three; SDXL: 3 levels, attention at the last two — and shrink only the widths, so every
module name (and so every LoRA key) matches the full-size model's and the WebUI's key converter
maps them to the right layers. Weights are random, seeded.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.models.tokenizer import load_clip_tokenizer

VOCAB_SIZE = 49408
SCHEDULER_KWARGS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1,
)


def unet_config(arch: str) -> dict[str, Any]:
    common: dict[str, Any] = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                  norm_num_groups=32)
    if arch in ("sd1", "sd2"):
        return {
            **common,
            "block_out_channels": (32, 64, 128, 128),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 32,
            "attention_head_dim": 8 if arch == "sd1" else (2, 4, 8, 8),
            "use_linear_projection": arch == "sd2",
        }
    if arch == "sdxl":
        return {
            **common,
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
    raise ValueError(f"unknown arch {arch!r}")


def vae_config(arch: str) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 64, 64), sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025 if arch == "sdxl" else 0.18215,
    )


def text_config(act: str = "quick_gelu", projection_dim: int = 32) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def build_components(arch: str = "sd1", seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The pieces of a diffusers pipeline for ``arch`` ("sd1", "sd2", "sdxl"), randomly initialised."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    parts: dict[str, Any] = {
        "unet": UNet2DConditionModel(**unet_config(arch)),
        "vae": AutoencoderKL(**vae_config(arch)),
        "scheduler": DDPMScheduler(**SCHEDULER_KWARGS, prediction_type=prediction_type),
    }
    if arch == "sd1":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config("quick_gelu")))
        parts["tokenizer"] = load_clip_tokenizer()
    elif arch == "sd2":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config("gelu")))
        parts["tokenizer"] = load_clip_tokenizer(pad_token="!")
    else:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config("quick_gelu")))
        parts["tokenizer"] = load_clip_tokenizer()
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_config("gelu")))
        parts["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].eval().requires_grad_(False)
    return parts


def build_pipeline(arch: str = "sd1", seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline) of tiny parts."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_components(arch, seed, prediction_type)
    if arch == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
