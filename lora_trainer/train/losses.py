"""The diffusion training maths as small pure functions (each has its own test).

Shapes: ``x0``/``noise`` (B, C, H, W), ``t`` (B,) int64 timesteps, ``alphas_cumprod`` (T,).
"""

from __future__ import annotations

import torch


def _at(ac: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] broadcast to ``like``'s shape, in fp32 on ``like``'s device."""
    a = ac.to(device=like.device, dtype=torch.float32)[t.to(like.device)]
    return a.view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    a = _at(alphas_cumprod, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def v_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Velocity target of v-prediction models: sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    a = _at(alphas_cumprod, t, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(x0, noise, t, alphas_cumprod)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


# The last a_t a zero-terminal-SNR schedule keeps: not 0, so SNR-based weights stay finite.
ZERO_TERMINAL_ALPHA = 4.8973451890853435e-08


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled to a signal-to-noise ratio of (almost) zero at its last timestep
    (Lin et al. 2023, kohya's zero_terminal_snr): sqrt(a_t) shifted so its last value is 0 and
    scaled so its first is unchanged; the last a_t is then set to :data:`ZERO_TERMINAL_ALPHA`.
    Computed in fp64, returned in the input's dtype."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    out = root ** 2
    out[-1] = ZERO_TERMINAL_ALPHA
    return out.to(alphas_cumprod.dtype)


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) per sample, fp32."""
    a = alphas_cumprod.float()[t.to(alphas_cumprod.device)]
    return a / (1 - a)


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023).

    epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1).
    """
    s = snr(t, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return clipped / s


def offset_noise(latents: torch.Tensor, strength: float, gen: torch.Generator | None = None,
                 random_strength: bool = False, adaptive_scale: float = 0.0) -> torch.Tensor:
    """Gaussian noise plus a per-channel constant offset (Guttenberg's noise offset).

    With ``strength`` 0 this is plain ``randn_like``. The noise is drawn on the generator's
    device and moved, so a CPU generator gives the same noise on every accelerator.
    ``random_strength`` (kohya's noise_offset_random_strength) draws the batch's strength
    uniformly from [0, strength); ``adaptive_scale`` (kohya's adaptive_noise_scale) adds that
    multiple of each channel's absolute latent mean to the strength, the sum kept at 0 or more.
    With both off the draws are the same as without them.
    """
    dev = gen.device if gen is not None else latents.device
    noise = torch.randn(latents.shape, generator=gen, device=dev, dtype=torch.float32)
    if strength > 0:
        b, c = latents.shape[:2]
        unit = (b, c, *([1] * (latents.dim() - 2)))
        scale: float | torch.Tensor = strength
        if random_strength:
            scale = strength * float(torch.rand((), generator=gen, device=dev))
        if adaptive_scale:
            means = latents.detach().float().mean(dim=tuple(range(2, latents.dim())), keepdim=True).abs()
            scale = (scale + adaptive_scale * means.to(dev)).clamp(min=0.0)
        noise = noise + scale * torch.randn(unit, generator=gen, device=dev, dtype=torch.float32)
    return noise.to(device=latents.device, dtype=latents.dtype)


def perturbed_noise(noise: torch.Tensor, gamma: float, random_strength: bool = False,
                    gen: torch.Generator | None = None) -> torch.Tensor | None:
    """Input perturbation (Ning et al. 2023, kohya's ip_noise_gamma): the noise the model's input
    is built from, ``noise + gamma * xi`` with fresh Gaussian ``xi``, while the target keeps
    ``noise``. ``random_strength`` draws the batch's gamma uniformly from [0, gamma). None when
    ``gamma`` is 0 (nothing is drawn)."""
    if not gamma:
        return None
    dev = gen.device if gen is not None else noise.device
    strength = gamma * float(torch.rand((), generator=gen, device=dev)) if random_strength else gamma
    xi = torch.randn(noise.shape, generator=gen, device=dev, dtype=torch.float32)
    return (noise.float() + strength * xi.to(noise.device)).to(noise.dtype)


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, kohya's multires_noise: ``noise`` plus ``iterations``
    layers of coarser Gaussian noise, each upsampled to its size at ``discount`` ** i of the
    weight, every layer's scale drawn between 2 and 4 times smaller than the last; then scaled
    back to unit standard deviation. Drawn from ``gen`` (on its device), so runs and resumes
    repeat it. With ``iterations`` 0, ``noise`` itself."""
    if iterations <= 0:
        return noise
    dev = gen.device if gen is not None else noise.device
    b, c, h, w = noise.shape
    out = noise.to(dev, torch.float32).clone()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=gen, device=dev))
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        layer = torch.randn((b, c, hn, wn), generator=gen, device=dev, dtype=torch.float32)
        out += torch.nn.functional.interpolate(layer, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(device=noise.device, dtype=noise.dtype)


def sample_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator | None,
                     device: torch.device, low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform timesteps in [low, high) (high: ``num_train_timesteps`` when None)."""
    dev = gen.device if gen is not None else device
    top = num_train_timesteps if high is None else min(high, num_train_timesteps)
    return torch.randint(low, top, (batch,), generator=gen, device=dev).to(device)


def debiased_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased estimation loss weights: 1 / sqrt(SNR) (v-prediction: 1 / (SNR + 1)),
    the SNR capped at 1000, which evens out what each timestep contributes."""
    s = torch.clamp(snr(t, alphas_cumprod), max=1000.0)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / s.sqrt()


def v_like_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, scale_like_noise: bool = False,
                   v_pred_like: float = 0.0) -> torch.Tensor | None:
    """kohya's v-prediction loss weights, with s = SNR / (SNR + 1), the SNR capped at 1000:
    ``scale_like_noise`` (scale_v_pred_loss_like_noise_pred) weights a v-prediction loss by s,
    which gives each timestep the weight an epsilon-prediction loss would; ``v_pred_like``
    (v_pred_like_loss) adds that multiple of the loss divided by s, a v-prediction-like term
    for an epsilon model. None when both are off."""
    if not scale_like_noise and not v_pred_like:
        return None
    s = torch.clamp(snr(t, alphas_cumprod), max=1000.0)
    s = s / (s + 1)
    weights = s if scale_like_noise else torch.ones_like(s)
    return weights * (1 + v_pred_like / s) if v_pred_like else weights


def _masked(elementwise: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``elementwise`` times ``mask`` (B, 1, H, W), broadcast over channels; as is without one."""
    return elementwise if mask is None else elementwise * mask.to(elementwise.device, torch.float32)


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, times per-sample ``weights`` (min-SNR, prior loss), averaged.

    Computed in fp32 whatever the autocast dtype, so fp16 runs do not lose the small losses.
    ``mask`` (B, 1, H, W) in [0, 1] (data.alpha_mask) multiplies the squared error before the
    per-sample mean, which stays over every element as kohya's masked_loss takes it (a mostly
    transparent image contributes less, rather than its few visible pixels more); without it
    the result is bit for bit the unmasked one.
    """
    per_sample = _masked((pred.float() - target.float()).pow(2), mask).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()


LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


def huber_threshold(schedule: str, c: float, scale: float, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor | None = None, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Huber loss's threshold per sample (kohya's huber_c with huber_schedule), fp32:

    - constant: ``c * scale``;
    - exponential: ``c ** (t / T) * scale``, from ``scale`` at the clean end to ``c * scale`` at
      full noise (``t``: timesteps out of ``T``; a flow model's sigma with ``T`` 1);
    - snr (DDPM models): ``(1 - c) / (1 + sigma_t) ** 2 + c``, sigma_t = sqrt((1 - a_t) / a_t):
      near 1 (about squared error) at low noise, ``c`` at high noise.
    """
    if schedule == "constant":
        return torch.full(t.shape, c * scale, device=t.device, dtype=torch.float32)
    if schedule == "exponential":
        return torch.pow(torch.tensor(c, dtype=torch.float32), t.float() / num_train_timesteps).to(t.device) * scale
    if schedule == "snr":
        if alphas_cumprod is None:
            raise ValueError("the snr schedule needs a DDPM noise schedule")
        a = alphas_cumprod.float()[t.to(alphas_cumprod.device)]
        sigma = ((1 - a) / a).sqrt()
        return ((1 - c) / (1 + sigma) ** 2 + c).to(t.device)
    raise ValueError(f"unknown huber schedule {schedule!r}")


def weighted_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                  kind: str = "l2", threshold: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one step per sample, times per-sample ``weights``, averaged; in fp32. ``mask``
    (B, 1, H, W) multiplies the elementwise loss before the per-sample mean (see :func:`weighted_mse`).

    - l2: :func:`weighted_mse`, bit for bit;
    - l1: mean absolute error;
    - huber: pseudo-Huber with per-sample ``threshold`` c, ``2 c (sqrt(d^2 + c^2) - c)``: squared
      error for |d| much below c, ``2 c |d|`` above it;
    - smooth_l1: the same divided by c, ``2 (sqrt(d^2 + c^2) - c)``: |d|-like above c.
    """
    if kind == "l2":
        return weighted_mse(pred, target, weights, mask)
    diff = pred.float() - target.float()
    if kind == "l1":
        elementwise = diff.abs()
    elif kind in ("huber", "smooth_l1"):
        if threshold is None:
            raise ValueError(f"the {kind} loss needs a threshold per sample")
        c = threshold.to(diff.device, torch.float32).view(-1, *([1] * (diff.dim() - 1)))
        elementwise = torch.sqrt(diff * diff + c * c) - c
        elementwise = 2 * c * elementwise if kind == "huber" else 2 * elementwise
    else:
        raise ValueError(f"unknown loss type {kind!r}")
    per_sample = _masked(elementwise, mask).flatten(1).mean(dim=1)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device, torch.float32)
    return per_sample.mean()
