"""Training objectives: what one step feeds the model and what it must predict, and how a
sample image is denoised. The family's :class:`~lora_trainer.families.base.ObjectiveSpec` says
which; ``objective_for(bundle, train_cfg)`` builds it.

- :class:`DDPMObjective` (SD1/SD2/SDXL): integer timesteps, q_sample, epsilon or v target,
  min-SNR weights; samples with DDIM on the bundle's own schedule.
- :class:`FlowObjective` (SD3, Flux.1): rectified flow; sigma from logit-normal/uniform sampling
  with a fixed or resolution-dependent shift, noisy = (1 - s) x0 + s noise, target = noise - x0;
  samples with Euler steps over the shifted sigmas.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lora_trainer.families.base import ObjectiveSpec
from lora_trainer.train.losses import (
    debiased_weights,
    huber_threshold,
    min_snr_weights,
    q_sample,
    sample_timesteps,
    target_for,
    v_like_weights,
    zero_terminal_snr,
)

if TYPE_CHECKING:
    from diffusers import DDIMScheduler


def ddim_for(alphas_cumprod: torch.Tensor, prediction_type: str) -> DDIMScheduler:
    """A DDIM scheduler with exactly the bundle's training noise schedule."""
    from diffusers import DDIMScheduler

    ac = alphas_cumprod.double().cpu()
    prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    betas = (1 - ac / prev).clamp(0, 0.999).numpy()
    return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


@dataclass
class StepInputs:
    """One training step's model input and target: ``timesteps`` go to ``bundle.predict``."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor | None = None  # per-sample loss weights (min-SNR), None for 1
    # Conditioning the objective adds to the text's (Flux.1-dev's guidance value, (B,)).
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    threshold: torch.Tensor | None = None  # the Huber loss's c per sample (B,), None for l2 and l1


@dataclass(frozen=True)
class LossSpec:
    """The step's loss (train.loss_type) and, for huber and smooth_l1, its threshold's schedule."""

    kind: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0

    def threshold(self, t: torch.Tensor, alphas_cumprod: torch.Tensor | None,
                  num_train_timesteps: int) -> torch.Tensor | None:
        """The Huber threshold per sample of timesteps ``t`` (None for l2 and l1)."""
        if self.kind not in ("huber", "smooth_l1"):
            return None
        return huber_threshold(self.huber_schedule, self.huber_c, self.huber_scale, t, alphas_cumprod,
                               num_train_timesteps)


class Objective(Protocol):
    uses_cfg: bool  # sampling conditions on [negative, prompt] and combines them (CFG)

    def step_inputs(self, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,
                    input_noise: torch.Tensor | None = None) -> StepInputs: ...

    def denoise(self, bundle: Any, latents: torch.Tensor, cond: dict[str, torch.Tensor],
                size: torch.Tensor | None, steps: int, guidance_scale: float,
                autocast: Callable[[], Any]) -> torch.Tensor: ...

    def initial_latents(self, noise: torch.Tensor, steps: int) -> torch.Tensor: ...


def _cfg_combine(out: torch.Tensor, scale: float) -> torch.Tensor:
    uncond, text = out.chunk(2)
    return uncond + scale * (text - uncond)


class DDPMObjective:
    uses_cfg = True  # samples take two passes per step (negative and prompt)

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str, device: torch.device,
                 min_snr_gamma: float | None = None, timesteps: tuple[int, int | None] = (0, None),
                 debiased: bool = False, loss: LossSpec = LossSpec(), v_like: tuple[bool, float] = (False, 0.0)) -> None:
        self.alphas = alphas_cumprod.to(device, torch.float32)
        self.loss = loss
        self.prediction_type = prediction_type
        self.min_snr_gamma = min_snr_gamma
        self.timesteps = timesteps  # [low, high) of the timesteps trained (kohya's min/max_timestep)
        self.debiased = debiased
        self.v_like = v_like  # kohya's (scale_v_pred_loss_like_noise_pred, v_pred_like_loss)
        self.device = device

    def step_inputs(self, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,
                    input_noise: torch.Tensor | None = None) -> StepInputs:
        """``input_noise`` (input perturbation) builds the noisy input in place of ``noise``; the
        target is still made from ``noise``."""
        steps = sample_timesteps(latents.shape[0], int(self.alphas.shape[0]), gen, self.device, *self.timesteps)
        noisy = q_sample(latents, noise if input_noise is None else input_noise, steps, self.alphas)
        target = target_for(self.prediction_type, latents, noise, steps, self.alphas)
        weights = None
        if self.min_snr_gamma:
            weights = min_snr_weights(steps, self.alphas, self.min_snr_gamma, self.prediction_type)
        if self.debiased:
            debiased = debiased_weights(steps, self.alphas, self.prediction_type)
            weights = debiased if weights is None else weights * debiased
        v_like = v_like_weights(steps, self.alphas, *self.v_like)
        if v_like is not None:
            weights = v_like if weights is None else weights * v_like
        threshold = self.loss.threshold(steps, self.alphas, int(self.alphas.shape[0]))
        return StepInputs(noisy, steps, target, weights, threshold=threshold)

    def _scheduler(self, steps: int) -> Any:
        sched = ddim_for(self.alphas, self.prediction_type)
        sched.set_timesteps(steps)
        return sched

    def initial_latents(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        return noise * self._scheduler(steps).init_noise_sigma

    def denoise(self, bundle: Any, latents: torch.Tensor, cond: dict[str, torch.Tensor],
                size: torch.Tensor | None, steps: int, guidance_scale: float,
                autocast: Callable[[], Any]) -> torch.Tensor:
        sched = self._scheduler(steps)
        for t in sched.timesteps:
            x = torch.cat([latents] * 2)
            ts = torch.full((2,), int(t), device=latents.device, dtype=torch.long)
            with autocast():
                out = bundle.predict(x.to(bundle.dtype), ts, cond, size).float()
            latents = sched.step(_cfg_combine(out, guidance_scale), t, latents).prev_sample
        return latents


def time_shift(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's fixed shift: s' = shift s / (1 + (shift - 1) s); 1 is no shift."""
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_mu(tokens: int, spec: ObjectiveSpec) -> float:
    """Flux's shift parameter for an image of ``tokens`` latent patches: linear from
    base_shift at 256 tokens to max_shift at 4096."""
    slope = (spec.max_shift - spec.base_shift) / (4096 - 256)
    return spec.base_shift + slope * (tokens - 256)


def exponential_shift(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """Flux's resolution-dependent shift: e^mu / (e^mu + (1/s - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


class FlowObjective:
    def __init__(self, spec: ObjectiveSpec, device: torch.device, patch: int = 2, loss: LossSpec = LossSpec()) -> None:
        self.spec, self.device, self.patch, self.loss = spec, device, patch, loss
        self.uses_cfg = spec.cfg_sampling

    def _shift(self, sigma: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        if self.spec.resolution_shift:
            tokens = (latents.shape[-2] // self.patch) * (latents.shape[-1] // self.patch)
            return exponential_shift(sigma, resolution_mu(tokens, self.spec))
        return time_shift(sigma, self.spec.shift)

    def sample_sigmas(self, batch: int, gen: torch.Generator, latents: torch.Tensor) -> torch.Tensor:
        s = self.spec
        dev = gen.device
        if s.sampling == "uniform":
            u = torch.rand((batch,), generator=gen, device=dev)
        else:
            std = s.sigmoid_scale if s.sampling == "sigmoid" else s.logit_std
            mean = 0.0 if s.sampling == "sigmoid" else s.logit_mean
            u = torch.sigmoid(torch.randn((batch,), generator=gen, device=dev) * std + mean)
        return self._shift(u.to(self.device, torch.float32), latents)

    def step_inputs(self, latents: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,
                    input_noise: torch.Tensor | None = None) -> StepInputs:
        sigma = self.sample_sigmas(latents.shape[0], gen, latents)
        s = sigma.view(-1, *([1] * (latents.dim() - 1)))
        noised = noise if input_noise is None else input_noise
        noisy = ((1 - s) * latents.float() + s * noised.float()).to(latents.dtype)
        target = (noise.float() - latents.float()).to(latents.dtype)
        cond = {}
        if self.spec.guidance_input:
            cond["guidance"] = torch.full((latents.shape[0],), self.spec.train_guidance, device=latents.device)
        threshold = self.loss.threshold(sigma, None, 1)  # sigma in [0, 1] stands for timestep / T
        return StepInputs(noisy, sigma, target, None, cond, threshold)

    def schedule(self, steps: int, latents: torch.Tensor) -> torch.Tensor:
        """The sampling sigmas from 1 to 0 (steps + 1 values), shifted as in training."""
        sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        shifted = self._shift(sigmas, latents).float()
        return torch.cat([shifted, torch.zeros(1)])

    def initial_latents(self, noise: torch.Tensor, steps: int) -> torch.Tensor:
        return noise

    def denoise(self, bundle: Any, latents: torch.Tensor, cond: dict[str, torch.Tensor],
                size: torch.Tensor | None, steps: int, guidance_scale: float,
                autocast: Callable[[], Any]) -> torch.Tensor:
        sigmas = self.schedule(steps, latents).to(latents.device)
        cfg = self.spec.cfg_sampling
        if self.spec.guidance_input:  # distilled guidance: one pass with the scale as an input
            cond = {**cond, "guidance": torch.full((latents.shape[0],), float(guidance_scale),
                                                   device=latents.device)}
        for i in range(steps):
            x = torch.cat([latents] * 2) if cfg else latents
            ts = torch.full((x.shape[0],), float(sigmas[i]), device=latents.device)
            with autocast():
                out = bundle.predict(x.to(bundle.dtype), ts, cond, size).float()
            velocity = _cfg_combine(out, guidance_scale) if cfg else out
            latents = latents + (sigmas[i + 1] - sigmas[i]) * velocity
        return latents


def configured_spec(spec: ObjectiveSpec, train_cfg: Any = None) -> ObjectiveSpec:
    """``spec`` with the config's train.timestep_sampling / discrete_flow_shift / guidance_scale
    where they are set ("auto" / empty keeps the family's); they apply to flow families only."""
    if train_cfg is None:
        return spec
    from lora_trainer.errors import ConfigError

    sampling = getattr(train_cfg, "timestep_sampling", "auto")
    shift = getattr(train_cfg, "discrete_flow_shift", None)
    guidance = getattr(train_cfg, "guidance_scale", None)
    spreads = {name: getattr(train_cfg, name, None) for name in ("sigmoid_scale", "logit_mean", "logit_std")}
    weighting = getattr(train_cfg, "weighting_scheme", "uniform")
    if spec.kind != "flow":
        for name, value, unset in (("timestep_sampling", sampling, "auto"), ("discrete_flow_shift", shift, None),
                                   ("guidance_scale", guidance, None), ("weighting_scheme", weighting, "uniform"),
                                   *((name, value, None) for name, value in spreads.items())):
            if value != unset:
                raise ConfigError(f"train.{name}: applies to rectified-flow models (Flux.1, SD3.5) only; "
                                  f"leave it at {unset or 'empty'} for this model")
        return spec
    for name, ddpm_only in _DDPM_ONLY.items():
        if getattr(train_cfg, name, None) not in (None, 0, False):
            raise ConfigError(f"train.{name}: {ddpm_only} is for DDPM models (SD1/SD2/SDXL); leave it at its "
                              "default for a rectified-flow model")
    if getattr(train_cfg, "loss_type", "l2") in ("huber", "smooth_l1") and \
            getattr(train_cfg, "huber_schedule", "snr") == "snr":
        raise ConfigError("train.huber_schedule: snr follows a DDPM noise schedule (SD1/SD2/SDXL); set it to "
                          "exponential or constant for a rectified-flow model")
    if sampling == "shift":  # kohya's: sigmoid of a normal, then a fixed shift (its default 3.0)
        sampling, spec = "sigmoid", replace(spec, resolution_shift=False, shift=spec.shift if spec.shift != 1 else 3.0)
    if sampling == "flux_shift":  # kohya's: sigmoid of a normal, then Flux's resolution shift
        sampling, spec = "sigmoid", replace(spec, resolution_shift=True)
    if sampling == "sigma":  # kohya's: drawn by weighting_scheme, then a fixed shift (its default 3.0)
        sampling, spec = weighting, replace(spec, resolution_shift=False, shift=3.0)
    spec = replace(spec, **{name: float(value) for name, value in spreads.items() if value is not None})
    if sampling != "auto":
        spec = replace(spec, sampling=sampling)
    if shift is not None:
        spec = replace(spec, shift=float(shift), resolution_shift=False)
    if guidance is not None:
        spec = replace(spec, train_guidance=float(guidance))
    return spec


# LoopConfig fields that shape DDPM training only -> what they are, for the error on a flow model.
_DDPM_ONLY = {"min_snr_gamma": "Min-SNR weighting", "debiased_estimation_loss": "the debiased estimation loss",
              "min_timestep": "a timestep range", "max_timestep": "a timestep range",
              "scale_v_pred_loss_like_noise_pred": "the v-prediction loss scale", "v_pred_like_loss": "the v-prediction-like loss",
              "zero_terminal_snr": "a zero-terminal-SNR schedule"}


def objective_for(bundle: Any, min_snr_gamma: float | None = None, train_cfg: Any = None) -> Objective:
    """The training objective of ``bundle``'s family (its ObjectiveSpec, or the bundle's own),
    with the config's flow or DDPM settings (``train_cfg``, a LoopConfig) applied."""
    spec: ObjectiveSpec = configured_spec(bundle.objective_spec, train_cfg)
    device = torch.device(bundle.device)
    loss = LossSpec(getattr(train_cfg, "loss_type", "l2"), getattr(train_cfg, "huber_c", 0.1),
                    getattr(train_cfg, "huber_schedule", "snr"), getattr(train_cfg, "huber_scale", 1.0))
    if spec.kind == "flow":
        return FlowObjective(spec, device, loss=loss)
    timesteps = (getattr(train_cfg, "min_timestep", 0), getattr(train_cfg, "max_timestep", None))
    v_like = (bool(getattr(train_cfg, "scale_v_pred_loss_like_noise_pred", False)),
              float(getattr(train_cfg, "v_pred_like_loss", 0.0) or 0.0))
    if v_like[0] and bundle.prediction_type != "v_prediction":
        from lora_trainer.errors import ConfigError

        raise ConfigError("train.scale_v_pred_loss_like_noise_pred: this model predicts noise (epsilon), not v; "
                          "turn it off (it is for v-prediction models such as SD2 768-v)")
    alphas = bundle.alphas_cumprod
    if getattr(train_cfg, "zero_terminal_snr", False):
        alphas = zero_terminal_snr(torch.as_tensor(alphas))
    return DDPMObjective(alphas, bundle.prediction_type, device, min_snr_gamma, timesteps,
                         bool(getattr(train_cfg, "debiased_estimation_loss", False)), loss, v_like)
