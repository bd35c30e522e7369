"""Turn diffusers parts into a ModelBundle the trainer can use, asking the family what differs.

The family (:mod:`lora_trainer.families`) says which text encoders and tokenizers the parts hold,
how captions become conditioning, whether the VAE stays fp32, whether the UNet takes SDXL's
size conditioning, and the pipeline class that renders it; ``bundle_from_diffusers`` is the rest.
The callables mirror what the diffusers pipelines do at inference, so a LoRA trained on a bundle
behaves the same when rendered by diffusers or by the WebUI.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.families import Family, get_family
from lora_trainer.models import placement
from lora_trainer.models.bundle import Conditioning, ModelBundle, TextEncoderPart


def training_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """alphas_cumprod of the training (DDPM) schedule described by any diffusers scheduler's config."""
    from diffusers import DDPMScheduler

    ddpm = scheduler if isinstance(scheduler, DDPMScheduler) else DDPMScheduler.from_config(scheduler.config)
    return ddpm.alphas_cumprod.detach().clone().float()


def _make_image_codec(vae: Any, out_dtype: torch.dtype):
    scale = float(vae.config.scaling_factor)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        latents = vae.encode(pixels.to(p.device, p.dtype)).latent_dist.sample()
        return ((latents - shift) * scale).to(out_dtype)

    def decode_latents(latents: torch.Tensor) -> torch.Tensor:
        p = next(vae.parameters())
        pixels = vae.decode(latents.to(p.device, p.dtype) / scale + shift).sample
        return pixels.clamp(-1, 1).float()

    return encode_images, decode_latents


def _make_predict(unet: Any, family: Family, vae_scale_factor: int):
    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                size_info: torch.Tensor | None = None) -> torch.Tensor:
        p = next(unet.parameters())
        noisy = noisy.to(p.device, p.dtype)
        context = cond["context"].to(p.device, p.dtype)
        kwargs: dict[str, Any] = {}
        if family.uses_size_info:
            if size_info is None:
                size_info = default_size_info(noisy, vae_scale_factor)
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["pooled"].to(p.device, p.dtype),
                "time_ids": size_info.to(p.device, p.dtype),
            }
        return unet(noisy, timesteps.to(p.device), encoder_hidden_states=context, **kwargs).sample

    return predict


def default_size_info(latents: torch.Tensor, vae_scale_factor: int = 8) -> torch.Tensor:
    """SDXL time ids for uncropped images at the latents' pixel size: [h, w, 0, 0, h, w] per row."""
    h, w = latents.shape[-2] * vae_scale_factor, latents.shape[-1] * vae_scale_factor
    row = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32, device=latents.device)
    return row.repeat(latents.shape[0], 1)


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a frozen module to device/dtype; skip the no-op move (diffusers warns on every cast)."""
    p = next(module.parameters(), None)
    if p is not None and (p.device != device or p.dtype != dtype):
        module.to(device=device, dtype=dtype)
    return module.eval().requires_grad_(False)


def _missing_parts(parts: dict[str, Any], family: Family) -> list[str]:
    needed = ["unet", "vae", "scheduler"] + [k for _, te, tok in family.text_encoder_folders for k in (te, tok)]
    return [k for k in needed if parts.get(k) is None]


def bundle_from_diffusers(parts: dict[str, Any], arch: str, prediction_type: str | None = None,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          name: str = "model", default_resolution: int | None = None) -> ModelBundle:
    """A ModelBundle over diffusers parts (``tiny.build_components`` or a pipeline's ``components``).

    Moves the modules to ``device``/``dtype`` in place (the SDXL VAE stays fp32) and freezes them.
    ``prediction_type`` None or "auto" reads the scheduler's. ``default_resolution`` None derives
    it from the UNet's sample size (512 SD1, 768 SD2-v, 1024 SDXL, 64 for the tiny demo model).
    """
    family = get_family(arch)
    missing = _missing_parts(parts, family)
    if missing:
        raise ModelLoadError(f"{name}: the {arch} model lacks the part(s) {', '.join(missing)}")
    device = torch.device(device)
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    if prediction_type in (None, "auto"):
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"{name}: prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")

    vae_dtype = torch.float32 if family.vae_fp32 else dtype
    _place(unet, placement.denoiser_target(device), dtype)  # the host's memory until the caches are filled
    _place(vae, device, vae_dtype)
    encoders, tokenizers, te_parts = [], [], []
    for key, te_key, tok_key in family.text_encoder_folders:
        te = _place(parts[te_key], device, dtype)
        encoders.append(te)
        tokenizers.append(parts[tok_key])
        te_parts.append(TextEncoderPart(key=key, module=te, naming="hf_clip"))

    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if default_resolution is None:
        default_resolution = int(unet.config.sample_size) * vae_scale_factor
    encode_images, decode_latents = _make_image_codec(vae, dtype)
    return ModelBundle(
        arch=arch, prediction_type=prediction_type, unet=unet, unet_naming="diffusers",
        text_encoders=te_parts, vae=vae, alphas_cumprod=training_alphas_cumprod(scheduler),
        encode_images=encode_images, encode_text=family.make_encode_text(encoders, tokenizers, device),
        encode_weighted=family.make_encode_text(encoders, tokenizers, device, weighted=True),
        make_encoder=lambda weighted, chunks: family.make_encode_text(encoders, tokenizers, device, weighted, chunks),
        predict=_make_predict(unet, family, vae_scale_factor), decode_latents=decode_latents,
        name=name, default_resolution=default_resolution,
        latent_channels=int(vae.config.latent_channels), vae_scale_factor=vae_scale_factor,
        device=device, dtype=dtype,
        extras={
            "parts": parts, "scheduler": scheduler, "tokenizers": tokenizers,
            "pipeline_class": family.pipeline_class, "vae_dtype": vae_dtype, **placement.deferred_extras(device),
        },
    )
