"""Per-architecture setup: turn diffusers parts into a ModelBundle the trainer can use.

Each family (SD1, SD2, SDXL) is one ``ArchSetup`` entry in the explicit ``SETUPS`` table; the
generic ``bundle_from_diffusers`` reads it. The callables it builds mirror what the diffusers
pipelines do at inference (``encode_prompt``, the UNet call), so a LoRA trained on a bundle
behaves the same when rendered by diffusers or by the WebUI.

Text conditioning per family:
- SD1: CLIP-L ``last_hidden_state``.
- SD2: the diffusers-format OpenCLIP-H text encoder already ends one layer early (23 of 24
  layers; single-file conversion drops the last block), so its ``last_hidden_state`` *is*
  OpenCLIP's penultimate layer followed by the final layer norm — what the WebUI and the
  original SD2 code feed the UNet. Taking ``hidden_states[-2]`` here would skip one more layer.
- SDXL: ``hidden_states[-2]`` of CLIP-L and of OpenCLIP-bigG (no final norm), concatenated on
  the channel axis; pooled = bigG's projected ``text_embeds``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.models.bundle import Conditioning, ModelBundle, TextEncoderPart

MAX_TOKENS = 77


@dataclass(frozen=True)
class ArchSetup:
    """What differs between families; everything else in ``bundle_from_diffusers`` is shared."""

    arch: str
    # (bundle key, parts key of the text encoder, parts key of its tokenizer)
    text_encoders: tuple[tuple[str, str, str], ...]
    # builds encode_text from (text encoders, tokenizers, device)
    make_encode_text: Callable[[list[Any], list[Any], torch.device], Callable[[list[str]], Conditioning]]
    pipeline_class: str
    # SDXL's VAE overflows in fp16 (NaN latents): keep it in fp32 whatever the weight dtype.
    vae_fp32: bool = False
    # SDXL's UNet takes pooled text embeddings and size/crop time ids.
    added_cond: bool = False


def _tokenize(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(list(captions), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def _encode_last_hidden(encoders: list[Any], tokenizers: list[Any], device: torch.device):
    (te,), (tok,) = encoders, tokenizers

    def encode_text(captions: list[str]) -> Conditioning:
        out = te(_tokenize(tok, captions, device), output_hidden_states=False)
        return {"context": out.last_hidden_state}

    return encode_text


def _encode_sdxl(encoders: list[Any], tokenizers: list[Any], device: torch.device):
    (te1, te2), (tok1, tok2) = encoders, tokenizers

    def encode_text(captions: list[str]) -> Conditioning:
        out1 = te1(_tokenize(tok1, captions, device), output_hidden_states=True)
        out2 = te2(_tokenize(tok2, captions, device), output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return {"context": context, "pooled": out2.text_embeds}

    return encode_text


SETUPS: dict[str, ArchSetup] = {
    "sd1": ArchSetup("sd1", (("te", "text_encoder", "tokenizer"),), _encode_last_hidden,
                     "StableDiffusionPipeline"),
    "sd2": ArchSetup("sd2", (("te", "text_encoder", "tokenizer"),), _encode_last_hidden,
                     "StableDiffusionPipeline"),
    "sdxl": ArchSetup("sdxl", (("te1", "text_encoder", "tokenizer"), ("te2", "text_encoder_2", "tokenizer_2")),
                      _encode_sdxl, "StableDiffusionXLPipeline", vae_fp32=True, added_cond=True),
}


def get_setup(arch: str) -> ArchSetup:
    try:
        return SETUPS[arch]
    except KeyError:
        raise ModelLoadError(f"model.arch {arch!r} is not supported; use one of {sorted(SETUPS)}") from None


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


def _make_predict(unet: Any, setup: ArchSetup, vae_scale_factor: int):
    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                size_info: torch.Tensor | None = None) -> torch.Tensor:
        p = next(unet.parameters())
        noisy = noisy.to(p.device, p.dtype)
        context = cond["context"].to(p.device, p.dtype)
        kwargs: dict[str, Any] = {}
        if setup.added_cond:
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


def _install_hidden_state_hooks(encoders: list[Any], tokenizers: list[Any], device: torch.device) -> None:
    """Run each encoder once with output_hidden_states before any LoRA is injected.

    transformers 5 installs its hidden-state capturing hooks on the first such call and marks the
    module with an attribute; a LoRA removal that restores the module's attributes as they were
    at injection drops that mark, the hooks get installed twice and ``hidden_states[-2]`` (what
    SDXL uses) silently points at the wrong layer. Installing them up front keeps them stable.
    """
    with torch.no_grad():
        for te, tok in zip(encoders, tokenizers, strict=True):
            te(_tokenize(tok, [""], device), output_hidden_states=True)


def _missing_parts(parts: dict[str, Any], setup: ArchSetup) -> list[str]:
    needed = ["unet", "vae", "scheduler"] + [k for _, te, tok in setup.text_encoders for k in (te, tok)]
    return [k for k in needed if parts.get(k) is None]


def bundle_from_diffusers(parts: dict[str, Any], arch: str, prediction_type: str | None = None,
                          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          name: str = "model", default_resolution: int | None = None) -> ModelBundle:
    """A ModelBundle over diffusers parts (``tiny.build_components`` or a pipeline's ``components``).

    Moves the modules to ``device``/``dtype`` in place (the SDXL VAE stays fp32) and freezes them.
    ``prediction_type`` None or "auto" reads the scheduler's. ``default_resolution`` None derives
    it from the UNet's sample size (512 SD1, 768 SD2-v, 1024 SDXL, 64 for the tiny demo model).
    """
    setup = get_setup(arch)
    missing = _missing_parts(parts, setup)
    if missing:
        raise ModelLoadError(f"{name}: the {arch} model lacks the part(s) {', '.join(missing)}")
    device = torch.device(device)
    unet, vae, scheduler = parts["unet"], parts["vae"], parts["scheduler"]
    if prediction_type in (None, "auto"):
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"{name}: prediction type {prediction_type!r} is not supported (epsilon or v_prediction)")

    vae_dtype = torch.float32 if setup.vae_fp32 else dtype
    _place(unet, device, dtype)
    _place(vae, device, vae_dtype)
    encoders, tokenizers, te_parts = [], [], []
    for key, te_key, tok_key in setup.text_encoders:
        te = _place(parts[te_key], device, dtype)
        encoders.append(te)
        tokenizers.append(parts[tok_key])
        te_parts.append(TextEncoderPart(key=key, module=te, naming="hf_clip"))

    if setup.arch == "sdxl":
        _install_hidden_state_hooks(encoders, tokenizers, device)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if default_resolution is None:
        default_resolution = int(unet.config.sample_size) * vae_scale_factor
    encode_images, decode_latents = _make_image_codec(vae, dtype)
    return ModelBundle(
        arch=arch, prediction_type=prediction_type, unet=unet, unet_naming="diffusers",
        text_encoders=te_parts, vae=vae, alphas_cumprod=training_alphas_cumprod(scheduler),
        encode_images=encode_images, encode_text=setup.make_encode_text(encoders, tokenizers, device),
        predict=_make_predict(unet, setup, vae_scale_factor), decode_latents=decode_latents,
        name=name, default_resolution=default_resolution,
        latent_channels=int(vae.config.latent_channels), vae_scale_factor=vae_scale_factor,
        device=device, dtype=dtype,
        extras={
            "parts": parts, "scheduler": scheduler, "tokenizers": tokenizers,
            "pipeline_class": setup.pipeline_class, "vae_dtype": vae_dtype,
        },
    )
