"""Stable Diffusion 3.5 (medium, large): an MMDiT trained with rectified flow (shift 3.0,
logit-normal sigma), conditioned on CLIP-L and CLIP-G penultimate states (padded to T5's width)
followed by T5-XXL's states, and on the pooled CLIP-L + CLIP-G embeddings; samples with CFG.

The bundle feeds the transformer as diffusers' StableDiffusion3Pipeline does: timestep =
sigma * 1000.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_trainer.families.base import ObjectiveSpec
from lora_trainer.families.flow_parts import (
    T5_NAMING,
    FlowFamily,
    check_patchable,
    place_parts,
    token_ids,
)

if TYPE_CHECKING:
    import torch

    from lora_trainer.models.bundle import ModelBundle

SD3_KEY = "joint_blocks.0.x_block.attn.qkv.weight"
SD3_PREFIX = "model.diffusion_model."
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length
CLIP_TOKENS = 77


class SD3(FlowFamily):
    name, label = "sd3", "Stable Diffusion 3.5"
    default_resolution = 1024
    text_encoder_roots = ("te1", "te2", "te3")
    trainable_text_encoders = ("te1", "te2")
    t5_root = "te3"
    objective = ObjectiveSpec(kind="flow", sampling="logit_normal", shift=3.0, cfg_sampling=True)
    pipeline_class = "StableDiffusion3Pipeline"
    # CLIP-L and CLIP-G with projections (124 M + 695 M), T5-XXL encoder (4.76 G).
    text_encoder_params = 123_650_304 + 694_659_840 + 4_762_310_656
    vae_params = 83_819_683
    denoiser_params = {"medium": 2_243_171_520, "large": 8_056_627_520}

    def matches_state_dict(self, keys: set[str], state_dict: dict[str, Any]) -> bool:
        return SD3_KEY in keys or SD3_PREFIX + SD3_KEY in keys

    def variant_of_state_dict(self, state_dict: dict[str, Any]) -> str:
        return "medium" if any(".x_block.attn2." in k for k in state_dict) else "large"

    def build_bundle(self, parts: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str,
                     weight_dtype: str = "auto") -> ModelBundle:
        return sd3_bundle(parts, device, dtype, name, weight_dtype)

    def text_tokens(self, variant: str = "") -> int:
        return CLIP_TOKENS + T5_MAX_LENGTH  # CLIP-L and CLIP-G side by side, then T5

    def make_predict(self, denoiser: Any, dtype: torch.dtype) -> Any:
        return _predictor(denoiser, dtype)

    def tiny_denoiser_config(self, variant: str) -> dict[str, Any]:
        from lora_trainer.families.flow_tiny_configs import sd3_transformer_config

        return sd3_transformer_config(variant)

    def denoiser_class(self) -> Any:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def folder_parts(self) -> dict[str, tuple[str, str]]:
        return {"text_encoder": ("clip_proj", "model.clip_l"), "text_encoder_2": ("clip_proj", "model.clip_g"),
                "text_encoder_3": ("t5", "model.t5xxl"), "vae": ("vae", "model.vae"),
                "tokenizer": ("clip_tokenizer", ""), "tokenizer_2": ("clip_tokenizer_bang", ""),
                "tokenizer_3": ("t5_tokenizer", "model.t5_tokenizer")}


def sd3_variant(config: Any) -> str:
    """3.5 medium is an MMDiT-X (second attention in early blocks); 3.5 large has qk norm and no
    second attention; SD3.0 medium has neither and trains like 3.5 medium."""
    if config.dual_attention_layers or config.qk_norm is None:
        return "medium"
    return "large"


def _encoder(parts: dict[str, Any], device: torch.device) -> Any:
    import torch
    import torch.nn.functional as F

    clips = [(parts["text_encoder"], parts["tokenizer"]), (parts["text_encoder_2"], parts["tokenizer_2"])]
    t5, tok_t5 = parts["text_encoder_3"], parts["tokenizer_3"]
    t5_len = parts.get("t5_max_length") or T5_MAX_LENGTH

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        states, pooled = [], []
        for enc, tok in clips:
            at = next(enc.parameters()).device
            out = enc(token_ids(tok, captions, tok.model_max_length, at), output_hidden_states=True)
            states.append(out.hidden_states[-2].to(device))
            pooled.append(out.text_embeds.to(device))
        with torch.no_grad():  # T5 is never trained
            at = next(t5.parameters()).device
            t5_states = t5(token_ids(tok_t5, captions, t5_len, at), output_hidden_states=False)[0].to(device)
        clip_states = torch.cat(states, dim=-1)
        clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"context": torch.cat([clip_states, t5_states.to(clip_states.dtype)], dim=-2),
                "pooled": torch.cat(pooled, dim=-1)}

    return encode_text


def _predictor(transformer: Any, dtype: torch.dtype) -> Any:
    import torch

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                size_info: torch.Tensor | None = None) -> torch.Tensor:
        check_patchable(noisy)
        dev = noisy.device
        return transformer(hidden_states=noisy.to(dtype), timestep=(timesteps.to(dev, torch.float32) * 1000).to(dtype),
                           encoder_hidden_states=cond["context"].to(dev, dtype),
                           pooled_projections=cond["pooled"].to(dev, dtype), return_dict=False)[0]

    return predict


def sd3_bundle(parts: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str,
               weight_dtype: str = "auto") -> ModelBundle:
    """A ModelBundle from StableDiffusion3Pipeline parts (transformer, vae, text_encoder = CLIP-L,
    text_encoder_2 = CLIP-G, text_encoder_3 = T5, tokenizer..tokenizer_3; optional "t5_max_length")."""
    import torch

    from lora_trainer.models.bundle import ModelBundle, TextEncoderPart
    from lora_trainer.models.setups import _make_image_codec

    transformer = parts["transformer"]
    later = place_parts(parts, ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"), "text_encoder_3", device, dtype, weight_dtype)
    encode_images, decode_latents = _make_image_codec(parts["vae"], dtype)
    family = SD3()
    return ModelBundle(
        arch=family.name, prediction_type="flow", unet=transformer, unet_naming="diffusers",
        text_encoders=[TextEncoderPart("te1", parts["text_encoder"], "hf_clip"),
                       TextEncoderPart("te2", parts["text_encoder_2"], "hf_clip"),
                       TextEncoderPart("te3", parts["text_encoder_3"], T5_NAMING)],  # type: ignore[arg-type]
        vae=parts["vae"], alphas_cumprod=torch.empty(0), encode_images=encode_images,
        encode_text=_encoder(parts, device), predict=_predictor(transformer, dtype),
        decode_latents=decode_latents, name=name, default_resolution=family.default_resolution,
        latent_channels=int(parts["vae"].config.latent_channels), device=device, dtype=dtype,
        extras={"variant": sd3_variant(transformer.config),
                "tokenizers": [parts["tokenizer"], parts["tokenizer_2"], parts["tokenizer_3"]], **later},
    )
