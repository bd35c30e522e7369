"""A ModelBundle over the A1111 WebUI's live ``shared.sd_model`` (no weights copied).

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
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import HostError
from lora_trainer.models.bundle import ModelBundle, TextEncoderPart

SDXL_POOLED_DIM = 1280
# sgm embedders whose output follows the pooled text embedding in SDXL's ``y`` vector.
SDXL_SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def arch_of(sd_model: Any) -> str:
    for arch in ("sdxl", "sd2", "sd1"):
        if getattr(sd_model, f"is_{arch}", False):
            return arch
    if hasattr(sd_model, "conditioner"):
        return "sdxl"
    return "sd2" if hasattr(getattr(sd_model, "cond_stage_model", None), "model") else "sd1"


def _unwrap(embedder: nn.Module) -> nn.Module:
    return getattr(embedder, "wrapped", embedder)


def trainable_modules(sd_model: Any) -> dict[str, nn.Module]:
    """{"unet", "vae", "te"/"te1"/"te2"}: the live modules, by the names the kohya keys use."""
    arch = arch_of(sd_model)
    roots: dict[str, nn.Module] = {"unet": sd_model.model.diffusion_model, "vae": sd_model.first_stage_model}
    if arch == "sdxl":
        embedders = [e for e in sd_model.conditioner.embedders if hasattr(e, "wrapped")]
        if len(embedders) < 2:
            raise HostError("this SDXL checkpoint lacks one of its two text encoders; load a full SDXL base model")
        roots["te1"] = _text_root(_unwrap(embedders[0]))
        roots["te2"] = _text_root(_unwrap(embedders[1]))
    else:
        roots["te"] = _text_root(_unwrap(sd_model.cond_stage_model))
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


def bundle_from_sd_model(sd_model: Any, roots: dict[str, nn.Module], device: torch.device,
                         shared: Any = None) -> ModelBundle:
    """Build the bundle; ``shared`` (the WebUI's module) is used for names and hashes only."""
    arch = arch_of(sd_model)
    unet = roots["unet"]
    unet_dtype = next(unet.parameters()).dtype
    vae = roots["vae"]
    vae_dtype = next(vae.parameters()).dtype
    te_keys = ["te1", "te2"] if arch == "sdxl" else ["te"]
    text_encoders = [TextEncoderPart(k, roots[k], _naming(roots[k])) for k in te_keys]
    size_embedders = _sdxl_size_embedders(sd_model) if arch == "sdxl" else {}

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = pixels.to(device, vae_dtype)
            latents = sd_model.get_first_stage_encoding(sd_model.encode_first_stage(x))
        return latents.float()

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        with _autocast(device, unet_dtype):
            cond = sd_model.get_learned_conditioning(list(captions))
        if isinstance(cond, dict):  # SDXL: {"crossattn": (B,77,2048), "vector": (B,2816)}
            vector = cond["vector"].float()
            return {"context": cond["crossattn"].float(), "pooled": vector[:, :SDXL_POOLED_DIM], "vector": vector}
        return {"context": cond.float()}

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor],
                size_info: torch.Tensor | None) -> torch.Tensor:
        kwargs: dict[str, torch.Tensor] = {"context": cond["context"].to(device, unet_dtype)}
        if arch == "sdxl":
            kwargs["y"] = _sdxl_vector(cond, size_info, size_embedders).to(device, unet_dtype)
        with _autocast(device, unet_dtype):
            out = unet(noisy.to(device, unet_dtype), timesteps.to(device), **kwargs)
        return out.float()

    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pixels = sd_model.decode_first_stage(latents.to(device, vae_dtype))
        return pixels.float().clamp(-1, 1)

    info = getattr(sd_model, "sd_checkpoint_info", None)
    return ModelBundle(
        arch=arch,  # type: ignore[arg-type]
        prediction_type="v_prediction" if getattr(sd_model, "parameterization", "eps") == "v" else "epsilon",
        unet=unet, unet_naming="ldm", text_encoders=text_encoders, vae=vae,
        alphas_cumprod=_alphas_cumprod(sd_model),
        encode_images=encode_images, encode_text=encode_text, predict=predict, decode_latents=decode_latents,
        name=str(getattr(info, "model_name", None) or getattr(info, "name", None) or "webui-model"),
        model_hash=getattr(info, "sha256", None), legacy_hash=getattr(sd_model, "sd_model_hash", None),
        default_resolution=1024 if arch == "sdxl" else (768 if getattr(sd_model, "parameterization", "eps") == "v" else 512),
        latent_channels=int(getattr(sd_model, "latent_channels", 4)),
        device=device, dtype=unet_dtype,
        extras={"host": "a1111", "sd_model": sd_model, "vae_dtype": vae_dtype},
    )


def _sdxl_size_embedders(sd_model: Any) -> dict[str, nn.Module]:
    return {e.input_key: e for e in sd_model.conditioner.embedders
            if getattr(e, "input_key", None) in SDXL_SIZE_KEYS}


def _sdxl_vector(cond: dict[str, torch.Tensor], size_info: torch.Tensor | None,
                 embedders: dict[str, nn.Module]) -> torch.Tensor:
    """SDXL's ``y``: pooled text embedding + embeddings of (orig size, crop, target size)."""
    if size_info is None or len(embedders) < len(SDXL_SIZE_KEYS):
        if "vector" in cond:
            return cond["vector"]
        raise HostError("SDXL conditioning lacks its size vector; cache text embeddings again")
    pooled = cond["pooled"]
    size_info = size_info.to(pooled.device, torch.float32)
    parts = [pooled]
    for i, key in enumerate(SDXL_SIZE_KEYS):
        emb = embedders[key](size_info[:, 2 * i:2 * i + 2])
        parts.append(emb.reshape(emb.shape[0], -1).to(pooled.dtype))
    return torch.cat(parts, dim=1)
