"""Sample images during training: diffusers' DDIM scheduler over the bundle's callables.

A pipeline object would need the model in diffusers form; the bundle's encode_text / predict /
decode_latents work for every host (diffusers or the WebUI's LDM classes), so the loop that
calls them is here and the stepping maths is diffusers' DDIMScheduler.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_trainer.config import SampleConfig
from lora_trainer.train.objectives import objective_for


def latents_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a.permute(1, 2, 0).cpu().numpy())) for a in arr]


@torch.no_grad()
def render_sample(bundle: Any, cfg: SampleConfig, width: int, height: int,
                  encode: Any = None, autocast: Any = None) -> Image.Image:
    """One image for ``cfg.prompt`` with a fixed seed, denoised by the bundle's objective.

    ``encode`` defaults to bundle.encode_text; ``autocast`` is a factory of the run's autocast context.
    """
    encode = encode or bundle.encode_text
    device = bundle.device
    objective = objective_for(bundle)
    gen = torch.Generator("cpu").manual_seed(cfg.seed)
    f = bundle.vae_scale_factor
    noise = torch.randn((1, bundle.latent_channels, height // f, width // f), generator=gen)
    latents = objective.initial_latents(noise.to(device), cfg.steps)
    prompts = [cfg.negative_prompt, cfg.prompt] if objective.uses_cfg else [cfg.prompt]
    cond = encode(prompts)
    size = torch.tensor([[height, width, 0, 0, height, width]] * len(prompts), dtype=torch.float32,
                        device=device)
    latents = objective.denoise(bundle, latents, cond, size, cfg.steps, cfg.guidance_scale,
                                autocast or (lambda: torch.autocast(device.type, enabled=False)))
    if bundle.decode_latents is None:
        raise RuntimeError("this model has no decoder; sample images are not available")
    return latents_to_pil(bundle.decode_latents(latents.to(bundle.dtype)))[0]
