"""The reference loop the benchmark compares against.

It trains the way the diffusers text-to-image LoRA example does: a diffusers UNet with peft LoRA
layers on the attention projections, AdamW, a DDPM ``add_noise``, MSE on the noise, and the loss
read back every step for logging. It gets the same cached latents and text embeddings as our loop
(the example encodes with the VAE every step; giving it cached inputs makes the comparison
stricter for us, not looser).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The diffusers example's LoRA targets: the attention projections.
REFERENCE_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass
class LoopTiming:
    steps: int
    seconds: float  # for the timed steps only (after warm-up)
    images_per_step: int

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds > 0 else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.images_per_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference_loop(unet: nn.Module, latents: torch.Tensor, context: torch.Tensor, *, rank: int,
                       steps: int, warmup: int = 2, targets: Sequence[str] = REFERENCE_TARGETS,
                       lr: float = 1e-4, autocast_dtype: torch.dtype | None = None,
                       added_cond: dict[str, torch.Tensor] | None = None,
                       windows: Sequence[Callable[[], AbstractContextManager[Any]]] = ()) -> LoopTiming:
    """Time ``steps`` optimizer steps of the reference loop on one fixed batch; then, for each of
    ``windows`` (profilers), run ``steps`` more inside the context it makes.

    ``unet`` is changed in place (LoRA layers added); pass a fresh or disposable model.
    ``targets``: the modules that get a LoRA (peft names; default the example's attention
    projections), so a run with our default targets is compared with the same work.
    """
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    device = latents.device
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=list(targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=lr)
    bsz = latents.shape[0]
    kwargs = {"added_cond_kwargs": added_cond} if added_cond else {}

    def step() -> float:
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (bsz,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = unet(noisy, t, context, **kwargs).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach().item()  # the example logs the loss every step

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    timing = LoopTiming(steps, time.perf_counter() - start, bsz)
    for make in windows:
        with make():
            for _ in range(steps):
                step()
            _sync(device)
    return timing
