"""Configs of the tiny FLUX.1 and SD3.5 models (:mod:`lora_trainer.families.flow_tiny` builds them):
the real block structure, small widths. Apart from the builders, so the families can hand them out
(the memory estimate's tiny transformer) without importing the builders, which import the families.
"""

from __future__ import annotations

from typing import Any


def flux_transformer_config(variant: str = "dev") -> dict[str, Any]:
    return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=variant == "dev", axes_dims_rope=(2, 2, 4))


def sd3_transformer_config(variant: str = "medium") -> dict[str, Any]:
    medium = variant == "medium"  # 3.5 medium: MMDiT-X (a second attention in early blocks), qk norm
    return dict(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32,
                pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16,
                dual_attention_layers=(0,) if medium else (), qk_norm="rms_norm")


def flow_vae_config(family: str) -> dict[str, Any]:
    from lora_trainer.models.tiny import vae_config

    scale, shift = (0.3611, 0.1159) if family == "flux1" else (1.5305, 0.0609)
    return {**vae_config("sd1"), "latent_channels": 16, "scaling_factor": scale, "shift_factor": shift,
            "use_quant_conv": False, "use_post_quant_conv": False}
