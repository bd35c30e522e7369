"""FLUX.1 (dev and schnell): a rectified-flow transformer on packed 2x2 latent patches, CLIP-L's
pooled output and T5-XXL's states as conditioning. dev takes the guidance strength as an input
(guidance distilled) and shifts sigma by the image's size; schnell has neither.

The bundle feeds the transformer as diffusers' FluxPipeline does: latents packed to (B, HW/4,
64), image ids (0, row, col) per patch, text ids zero, timestep = sigma (the model scales it).
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

# kohya's "flux_shift" (sigmoid sampling, then the resolution shift), diffusers' guidance 3.5.
DEV_OBJECTIVE = ObjectiveSpec(kind="flow", sampling="sigmoid", resolution_shift=True, guidance_input=True,
                              cfg_sampling=False, train_guidance=3.5)
SCHNELL_OBJECTIVE = ObjectiveSpec(kind="flow", sampling="sigmoid", cfg_sampling=False)
T5_MAX_LENGTH = {"dev": 512, "schnell": 256}  # FluxPipeline's max_sequence_length
BFL_KEY = "double_blocks.0.img_attn.qkv.weight"
BFL_PREFIX = "model.diffusion_model."


class Flux1(FlowFamily):
    name, label = "flux1", "FLUX.1"
    default_resolution = 1024
    text_encoder_roots = ("te1", "te2")
    trainable_text_encoders = ("te1",)
    t5_root = "te2"
    objective = DEV_OBJECTIVE
    pipeline_class = "FluxPipeline"
    sample_guidance = 3.5  # dev's distilled guidance (the pipeline's default), not a CFG scale
    clip_caption_model = "ViT-L-14/openai"
    # CLIP-L (123 M) + T5-XXL encoder (4.76 G); VAE with 16 latent channels; the transformer.
    text_encoder_params = 123_060_480 + 4_762_310_656
    vae_params = 83_819_683
    denoiser_params = {"dev": 11_901_408_320, "schnell": 11_891_178_560}

    def matches_state_dict(self, keys: set[str], state_dict: dict[str, Any]) -> bool:
        return BFL_KEY in keys or BFL_PREFIX + BFL_KEY in keys

    def variant_objective(self, variant: str) -> ObjectiveSpec:
        return DEV_OBJECTIVE if variant == "dev" else SCHNELL_OBJECTIVE

    def variant_of_state_dict(self, state_dict: dict[str, Any]) -> str:
        return "dev" if any(k.endswith("guidance_in.in_layer.weight") for k in state_dict) else "schnell"

    def build_bundle(self, parts: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str,
                     weight_dtype: str = "auto") -> ModelBundle:
        return flux_bundle(parts, device, dtype, name, weight_dtype)

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        return {"sample.guidance_scale": self.sample_guidance}

    def text_tokens(self, variant: str = "") -> int:
        return T5_MAX_LENGTH[variant or self.default_variant()]

    def make_predict(self, denoiser: Any, dtype: torch.dtype) -> Any:
        return _predictor(denoiser, dtype)

    def tiny_denoiser_config(self, variant: str) -> dict[str, Any]:
        from lora_trainer.families.flow_tiny_configs import flux_transformer_config

        return flux_transformer_config(variant)

    def denoiser_class(self) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def folder_parts(self) -> dict[str, tuple[str, str]]:
        return {"text_encoder": ("clip", "model.clip_l"), "text_encoder_2": ("t5", "model.t5xxl"),
                "vae": ("vae", "model.vae"), "tokenizer": ("clip_tokenizer", ""),
                "tokenizer_2": ("t5_tokenizer", "model.t5_tokenizer")}


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): 2x2 patches as tokens, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(H/2 * W/2, 3) position ids: 0, patch row, patch column."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def _encoder(parts: dict[str, Any], device: torch.device) -> Any:
    import torch

    clip, t5 = parts["text_encoder"], parts["text_encoder_2"]
    tok_l, tok_t5 = parts["tokenizer"], parts["tokenizer_2"]
    variant = "dev" if parts["transformer"].config.guidance_embeds else "schnell"
    t5_len = parts.get("t5_max_length") or T5_MAX_LENGTH[variant]

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        at = next(clip.parameters()).device
        pooled = clip(token_ids(tok_l, captions, tok_l.model_max_length, at), output_hidden_states=False).pooler_output
        with torch.no_grad():  # T5 is never trained
            at = next(t5.parameters()).device
            context = t5(token_ids(tok_t5, captions, t5_len, at), output_hidden_states=False)[0]
        return {"context": context.to(device), "pooled": pooled.to(device)}

    return encode_text


def _predictor(transformer: Any, dtype: torch.dtype) -> Any:
    import torch

    guided = bool(transformer.config.guidance_embeds)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                size_info: torch.Tensor | None = None) -> torch.Tensor:
        check_patchable(noisy)
        dev = noisy.device
        b, _, h, w = noisy.shape
        context = cond["context"].to(dev, dtype)
        guidance = None
        if guided:
            guidance = cond.get("guidance", torch.ones(b, device=dev)).to(dev, torch.float32)
        out = transformer(hidden_states=pack_latents(noisy.to(dtype)), timestep=timesteps.to(dev, dtype),
                          guidance=guidance, pooled_projections=cond["pooled"].to(dev, dtype),
                          encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3, device=dev, dtype=dtype),
                          img_ids=image_ids(h, w, dev, dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    return predict


def flux_bundle(parts: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str,
                weight_dtype: str = "auto") -> ModelBundle:
    """A ModelBundle from FluxPipeline parts (transformer, vae, text_encoder = CLIP-L,
    text_encoder_2 = T5, tokenizer, tokenizer_2; optional "t5_max_length")."""
    import torch

    from lora_trainer.models.bundle import ModelBundle, TextEncoderPart
    from lora_trainer.models.setups import _make_image_codec

    transformer = parts["transformer"]
    later = place_parts(parts, ("transformer", "vae", "text_encoder", "text_encoder_2"), "text_encoder_2", device, dtype, weight_dtype)
    variant = "dev" if transformer.config.guidance_embeds else "schnell"
    encode_images, decode_latents = _make_image_codec(parts["vae"], dtype)
    family = Flux1()
    return ModelBundle(
        arch=family.name, prediction_type="flow", unet=transformer, unet_naming="diffusers",
        text_encoders=[TextEncoderPart("te1", parts["text_encoder"], "hf_clip"),
                       TextEncoderPart("te2", parts["text_encoder_2"], T5_NAMING)],  # type: ignore[arg-type]
        vae=parts["vae"], alphas_cumprod=torch.empty(0), encode_images=encode_images,
        encode_text=_encoder(parts, device), predict=_predictor(transformer, dtype),
        decode_latents=decode_latents, name=name, default_resolution=family.default_resolution,
        latent_channels=int(parts["vae"].config.latent_channels), device=device, dtype=dtype,
        extras={"variant": variant, "tokenizers": [parts["tokenizer"], parts["tokenizer_2"]], **later},
        objective=family.variant_objective(variant),
    )

