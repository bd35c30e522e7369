"""A ModelBundle over an A1111-style WebUI's live ``shared.sd_model`` (no weights copied).

Used by the A1111 host and, with the schedule and size embedding passed in, by the Forge host
(Forge's engines keep A1111's ``get_learned_conditioning``/``encode_first_stage`` methods).

Kept apart from ``hosts/a1111.py`` because it needs nothing from the WebUI's ``modules``: it
works on the model object alone (LDM ``LatentDiffusion`` for SD1/SD2, sgm ``DiffusionEngine``
for SDXL, as A1111 v1.10.1 builds and hijacks them), so tests drive it with the real LDM classes.

Trainable roots and their module naming, as the WebUI's Lora extension resolves keys:
- unet: ``sd_model.model.diffusion_model`` (LDM names, ``input_blocks.1.1.transformer_blocks...``)
- SD1 "te": ``cond_stage_model.wrapped.transformer`` (transformers CLIPTextModel: ``text_model.*``)
- SD2 "te": ``cond_stage_model.wrapped`` (open_clip embedder: ``model.transformer.resblocks.*``)
- SDXL "te1": ``conditioner.embedders[0].wrapped.transformer`` (CLIPTextModel),
  "te2": ``conditioner.embedders[1].wrapped`` (open_clip bigG: ``model.transformer.resblocks.*``)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.data.emphasis import escape_emphasis
from lora_trainer.errors import HostError
from lora_trainer.families import detect_webui_model
from lora_trainer.models.bundle import ModelBundle, TextEncoderPart

SDXL_POOLED_DIM = 1280
# sgm embedders whose output follows the pooled text embedding in SDXL's ``y`` vector.
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
# (B, 6) sizes [orig_h, orig_w, crop_top, crop_left, target_h, target_w] -> (B, 1536) embedding
SizeEmbed = Callable[[torch.Tensor], torch.Tensor]


def arch_of(sd_model: Any) -> str:
    """The family name of a WebUI model object (its ``is_sdxl``-style flag, else its parts)."""
    return detect_webui_model(sd_model).name


def _unwrap(embedder: nn.Module) -> nn.Module:
    return getattr(embedder, "wrapped", embedder)


def trainable_modules(sd_model: Any) -> dict[str, nn.Module]:
    """{"unet", "vae", "te"/"te1"/"te2"}: the live modules, by the names the kohya keys use."""
    family = detect_webui_model(sd_model)
    roots: dict[str, nn.Module] = {"unet": sd_model.model.diffusion_model, "vae": sd_model.first_stage_model}
    keys = family.text_encoder_roots
    if len(keys) > 1:  # sgm's conditioner holds the text encoders as embedders, in order
        embedders = [e for e in sd_model.conditioner.embedders if hasattr(e, "wrapped")]
        if len(embedders) < len(keys):
            raise HostError(f"this {family.label} checkpoint lacks one of its {len(keys)} text encoders; "
                            f"load a full {family.label} base model")
        for key, embedder in zip(keys, embedders, strict=False):
            roots[key] = _text_root(_unwrap(embedder))
    else:  # LDM: one text encoder
        roots[keys[0]] = _text_root(_unwrap(sd_model.cond_stage_model))
    return roots


def _text_root(wrapped: nn.Module) -> nn.Module:
    # transformers CLIP sits in ``.transformer`` (names start ``text_model.``); open_clip's
    # embedder is itself the root (names start ``model.transformer.resblocks``).
    transformer = getattr(wrapped, "transformer", None)
    return transformer if isinstance(transformer, nn.Module) and not hasattr(wrapped, "model") else wrapped


def _naming(module: nn.Module) -> str:
    return "open_clip" if hasattr(module, "model") and not hasattr(module, "text_model") else "hf_clip"


def _alphas_cumprod(sd_model: Any) -> torch.Tensor:
    # A1111 may replace alphas_cumprod per generation (downcast, zero-terminal-SNR); the
    # checkpoint's own schedule is kept in alphas_cumprod_original.
    ac = getattr(sd_model, "alphas_cumprod_original", None)
    if ac is None:
        ac = sd_model.alphas_cumprod
    return torch.as_tensor(ac).detach().to("cpu", torch.float32).clone()


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A float tensor autograd may save: Forge encodes under ``torch.inference_mode``, whose
    tensors cannot be saved for backward (a LoRA layer on ``to_k`` saves its input)."""
    t = t.float()
    return t.clone() if t.is_inference() else t


def bundle_from_sd_model(sd_model: Any, roots: dict[str, nn.Module], device: torch.device,
                         shared: Any = None, *, alphas_cumprod: torch.Tensor | None = None,
                         prediction_type: str | None = None, compute_dtype: torch.dtype | None = None,
                         size_embed: SizeEmbed | None = None, host: str = "a1111") -> ModelBundle:
    """Build the bundle over ``sd_model``'s own methods (``get_learned_conditioning``,
    ``encode_first_stage``, ``decode_first_stage``); ``roots`` name the live modules.

    A1111's LDM/sgm objects carry the schedule, the prediction type and SDXL's size embedders;
    a host whose model object does not (Forge's engines) passes them. ``compute_dtype``: the
    UNet's input dtype when it differs from its weights' (Forge casts weights per call).
    ``shared`` (the WebUI's module) is used for names and hashes only."""
    family = detect_webui_model(sd_model)
    unet = roots["unet"]
    unet_dtype = compute_dtype or next(unet.parameters()).dtype
    vae = roots["vae"]
    vae_dtype = next(vae.parameters()).dtype
    text_encoders = [TextEncoderPart(k, roots[k], _naming(roots[k])) for k in family.text_encoder_roots if k in roots]
    if family.uses_size_info and size_embed is None:
        size_embed = sgm_size_embed(sd_model)
    if prediction_type is None:
        prediction_type = "v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon"

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = pixels.to(device, vae_dtype)
            latents = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(x))
        return _plain(latents)

    def encode_weighted(captions: list[str]) -> dict[str, torch.Tensor]:
        with _autocast(device, unet_dtype):  # the WebUI reads a caption as a prompt: emphasis applies
            cond = sd_model.get_learned_conditioning(list(captions))
        if isinstance(cond, dict):  # SDXL: {"crossattn": (B,77,2048), "vector": (B,2816)}
            vector = _plain(cond["vector"])
            return {"context": _plain(cond["crossattn"]), "pooled": vector[:, :SDXL_POOLED_DIM], "vector": vector}
        return {"context": _plain(cond)}

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        return encode_weighted([escape_emphasis(c) for c in captions])  # its brackets as plain text

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                size_info: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"context": cond["context"].to(device, unet_dtype)}
        if family.uses_size_info:
            kwargs["y"] = _sdxl_vector(cond, size_info, size_embed).to(device, unet_dtype)
        with _autocast(device, unet_dtype):
            out = unet(noisy.to(device, unet_dtype), timesteps.to(device), **kwargs)
        return out.float()

    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = sd_model.decode_first_stage(latents.to(device, vae_dtype))
        return _plain(pixels).clamp(-1, 1)

    info = getattr(sd_model, "sd_checkpoint_info", None)
    return ModelBundle(
        arch=family.name,
        prediction_type=prediction_type,  # type: ignore[arg-type]
        unet=unet, unet_naming="ldm", text_encoders=text_encoders, vae=vae,
        alphas_cumprod=_alphas_cumprod(sd_model) if alphas_cumprod is None else alphas_cumprod,
        encode_images=encode_images, encode_text=encode_text, encode_weighted=encode_weighted, predict=predict,
        decode_latents=decode_latents,
        name=str(getattr(info, "model_name", None) or getattr(info, "name", None) or "webui-model"),
        model_hash=getattr(info, "sha256", None), legacy_hash=getattr(sd_model, "sd_model_hash", None),
        default_resolution=family.native_resolution(prediction_type),
        latent_channels=int(getattr(sd_model, "latent_channels", 4)),
        device=device, dtype=unet_dtype,
        extras={"host": host, "sd_model": sd_model, "vae_dtype": vae_dtype},
    )


def sgm_size_embed(sd_model: Any) -> SizeEmbed | None:
    """SDXL's size embedding through the sgm conditioner's own embedders (A1111, Forge Classic);
    None when the model has no such embedders."""
    conditioner = getattr(sd_model, "conditioner", None)
    embedders = {e.input_key: e for e in getattr(conditioner, "embedders", ())
                 if getattr(e, "input_key", None) in SDXL_SIZE_KEYS}
    if len(embedders) < len(SDXL_SIZE_KEYS):
        return None

    def embed(size_info: torch.Tensor) -> torch.Tensor:
        parts = []
        for i, key in enumerate(SDXL_SIZE_KEYS):
            emb = embedders[key](size_info[:, 2 * i:2 * i + 2])
            parts.append(emb.reshape(emb.shape[0], -1))
        return torch.cat(parts, dim=1)

    return embed


def _sdxl_vector(cond: dict[str, torch.Tensor], size_info: torch.Tensor | None,
                 size_embed: SizeEmbed | None) -> torch.Tensor:
    """SDXL's ``y``: pooled text embedding + embeddings of (orig size, crop, target size)."""
    if size_info is None or size_embed is None:
        if "vector" in cond:
            return cond["vector"]
        raise HostError("SDXL conditioning lacks its size vector; cache text embeddings again")
    pooled = cond["pooled"]
    sizes = size_embed(size_info.to(pooled.device, torch.float32))
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=1)
