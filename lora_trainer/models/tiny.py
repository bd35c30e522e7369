"""Tiny models built from config: the embedded demo model, tests, CPU benchmarks.

Each family keeps its real topology and shrinks only the widths (its ``tiny_*`` methods, e.g.
:mod:`lora_trainer.families.sd_tiny`), so every module name (and so every LoRA key) matches the
full-size model's and the WebUI's key converter maps them to the right layers. Weights are
random, seeded. The shared pieces (a tiny CLIP text encoder, the DDPM schedule) are here.
"""

from __future__ import annotations

from typing import Any

from lora_trainer.families import DEFAULT_FAMILY, get_family

VOCAB_SIZE = 49408
SCHEDULER_KWARGS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1,
)


def unet_config(arch: str) -> dict[str, Any]:
    """The tiny denoiser config of family ``arch``."""
    return get_family(arch).tiny_unet_config()


def vae_config(arch: str) -> dict[str, Any]:
    return get_family(arch).tiny_vae_config()


def text_config(act: str = "quick_gelu", projection_dim: int = 32) -> dict[str, Any]:
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
        projection_dim=projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def build_components(arch: str = DEFAULT_FAMILY, seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The pieces of a diffusers pipeline of family ``arch`` ("sd1", "sdxl", ...), randomly initialised."""
    return get_family(arch).tiny_components(seed, prediction_type)


def build_pipeline(arch: str = DEFAULT_FAMILY, seed: int = 0, prediction_type: str = "epsilon") -> Any:
    """A diffusers pipeline of the family's class (StableDiffusionPipeline, ...) over tiny parts."""
    import diffusers

    family = get_family(arch)
    parts = build_components(arch, seed, prediction_type)
    return getattr(diffusers, family.pipeline_class)(**parts, **family.render_pipeline_kwargs())
