"""Training objectives: DDPM as the loop always computed it, rectified flow as SD3/Flux define it."""

from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.families import ObjectiveSpec, get_family
from lora_trainer.train.losses import min_snr_weights, q_sample, sample_timesteps, target_for
from lora_trainer.train.objectives import (
    DDPMObjective,
    FlowObjective,
    exponential_shift,
    resolution_mu,
    time_shift,
)


def _schedule() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddpm_objective_draws_and_targets_exactly_as_the_loop_did(prediction: str) -> None:
    ac = _schedule()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    step = DDPMObjective(ac, prediction, torch.device("cpu"), min_snr_gamma=5.0).step_inputs(
        x0, noise, torch.Generator().manual_seed(7))
    t = sample_timesteps(3, 1000, torch.Generator().manual_seed(7), torch.device("cpu"))
    assert torch.equal(step.timesteps, t)
    assert torch.equal(step.noisy, q_sample(x0, noise, t, ac))
    assert torch.equal(step.target, target_for(prediction, x0, noise, t, ac))
    assert torch.equal(step.weights, min_snr_weights(t, ac, 5.0, prediction))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_timestep_range_and_the_debiased_estimation_weights(prediction: str) -> None:
    """kohya's min_timestep / max_timestep: every drawn timestep in [min, max); its
    debiased_estimation_loss: weights 1 / sqrt(SNR) (v-prediction 1 / (SNR + 1)), SNR capped at
    1000, times Min-SNR's where both are on."""
    from lora_trainer.train.losses import debiased_weights, snr

    ac = _schedule()
    x0, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    ranged = DDPMObjective(ac, prediction, torch.device("cpu"), timesteps=(200, 300)).step_inputs(
        x0, noise, torch.Generator().manual_seed(3))
    assert 200 <= int(ranged.timesteps.min()) and int(ranged.timesteps.max()) < 300 and ranged.weights is None
    both = DDPMObjective(ac, prediction, torch.device("cpu"), min_snr_gamma=5.0, debiased=True).step_inputs(
        x0, noise, torch.Generator().manual_seed(3))
    t = both.timesteps
    s = torch.clamp(snr(t, ac), max=1000.0)
    expected = 1 / (s + 1) if prediction == "v_prediction" else 1 / s.sqrt()
    assert torch.allclose(debiased_weights(t, ac, prediction), expected)
    assert torch.allclose(both.weights, min_snr_weights(t, ac, 5.0, prediction) * expected)
    assert float(debiased_weights(torch.tensor([0]), ac, "epsilon")) == pytest.approx(1 / 1000 ** 0.5)  # capped


def test_flow_objective_interpolates_and_targets_the_velocity() -> None:
    spec = ObjectiveSpec(kind="flow", sampling="uniform")
    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    step = FlowObjective(spec, torch.device("cpu")).step_inputs(x0, noise, torch.Generator().manual_seed(1))
    s = torch.rand(4, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(step.timesteps, s)
    assert torch.allclose(step.noisy, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise)
    assert torch.allclose(step.target, noise - x0)
    assert step.weights is None


def test_input_perturbation_noises_the_input_not_the_target_and_huber_thresholds_ride_along() -> None:
    """ip_noise_gamma: the noisy input is built from the perturbed noise, the target from the
    noise itself (DDPM and flow); with a Huber loss each sample gets its timestep's threshold."""
    from lora_trainer.train.losses import huber_threshold
    from lora_trainer.train.objectives import LossSpec

    ac = _schedule()
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    perturbed = noise + 0.1 * torch.randn(3, 4, 8, 8)
    huber = LossSpec("huber", 0.1, "snr")
    step = DDPMObjective(ac, "v_prediction", torch.device("cpu"), loss=huber).step_inputs(
        x0, noise, torch.Generator().manual_seed(7), perturbed)
    t = step.timesteps
    assert torch.equal(step.noisy, q_sample(x0, perturbed, t, ac))
    assert torch.equal(step.target, target_for("v_prediction", x0, noise, t, ac))
    assert torch.equal(step.threshold, huber_threshold("snr", 0.1, 1.0, t, ac, 1000))
    plain = DDPMObjective(ac, "epsilon", torch.device("cpu")).step_inputs(x0, noise, torch.Generator().manual_seed(7))
    assert plain.threshold is None and torch.equal(plain.noisy, q_sample(x0, noise, t, ac))

    spec = ObjectiveSpec(kind="flow", sampling="uniform")
    flow = FlowObjective(spec, torch.device("cpu"), loss=LossSpec("smooth_l1", 0.2, "exponential", 3.0)).step_inputs(
        x0, noise, torch.Generator().manual_seed(1), perturbed)
    s = flow.timesteps.view(-1, 1, 1, 1)
    assert torch.allclose(flow.noisy, (1 - s) * x0 + s * perturbed)
    assert torch.allclose(flow.target, noise - x0)
    assert torch.allclose(flow.threshold, 0.2 ** flow.timesteps * 3.0)


def test_kohya_v_prediction_loss_weights() -> None:
    """scale_v_pred_loss_like_noise_pred weights each sample by s = SNR / (SNR + 1) (SNR capped
    at 1000); v_pred_like_loss adds v x the loss / s; with Min-SNR both multiply its weights. An
    epsilon model refuses the scale in one line before training."""
    from lora_trainer.errors import ConfigError
    from lora_trainer.train.losses import snr
    from lora_trainer.train.objectives import objective_for

    ac = _schedule()
    x0, noise = torch.randn(64, 4, 8, 8), torch.randn(64, 4, 8, 8)
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    step = DDPMObjective(ac, "v_prediction", torch.device("cpu"), min_snr_gamma=5.0, v_like=(True, 0.2)).step_inputs(
        x0, noise, gen())
    t = step.timesteps
    s = torch.clamp(snr(t, ac), max=1000.0)
    s = s / (s + 1)
    expected = min_snr_weights(t, ac, 5.0, "v_prediction") * s * (1 + 0.2 / s)
    assert torch.allclose(step.weights, expected)
    plain = DDPMObjective(ac, "epsilon", torch.device("cpu"), v_like=(False, 0.1)).step_inputs(x0, noise, gen())
    assert torch.allclose(plain.weights, 1 + 0.1 / s)
    assert float(plain.weights.min()) > 1.0 and float(plain.weights.max()) > 1.5  # noisy steps gain the most
    bundle = type("B", (), {"objective_spec": get_family("sd1").objective, "device": "cpu",
                            "alphas_cumprod": ac, "prediction_type": "epsilon"})()
    like = objective_for(bundle, None, type("T", (), {"v_pred_like_loss": 0.1})()).step_inputs(x0, noise, gen())
    assert torch.equal(like.weights, plain.weights)  # the config's key reaches the objective
    cfg = type("T", (), {"scale_v_pred_loss_like_noise_pred": True})()
    with pytest.raises(ConfigError, match="scale_v_pred_loss_like_noise_pred: this model predicts noise"):
        objective_for(bundle, None, cfg)


def test_zero_terminal_snr_rescales_the_schedule_the_run_trains_and_samples_with() -> None:
    """kohya's zero_terminal_snr: sqrt(a_t) shifted and scaled so the first a_t is kept and the
    last is (almost) 0, SNR-based weights stay finite there; objective_for trains and samples on
    that schedule when the config asks."""
    from lora_trainer.train.losses import ZERO_TERMINAL_ALPHA, debiased_weights, zero_terminal_snr
    from lora_trainer.train.objectives import objective_for

    ac = _schedule()
    z = zero_terminal_snr(ac)
    assert z.dtype == ac.dtype and z.shape == ac.shape
    assert float(z[0]) == pytest.approx(float(ac[0]), rel=1e-6) and float(z[-1]) == pytest.approx(ZERO_TERMINAL_ALPHA, rel=1e-6)
    assert bool((z[1:] < z[:-1]).all())  # still decreasing
    root = ac.double().sqrt()
    expected = ((root - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert torch.allclose(z[:-1].double(), expected[:-1])
    last = torch.tensor([999])
    assert torch.isfinite(min_snr_weights(last, z, 5.0, "epsilon")).all()
    assert torch.isfinite(debiased_weights(last, z, "v_prediction")).all()
    bundle = type("B", (), {"objective_spec": get_family("sd2").objective, "device": "cpu",
                            "alphas_cumprod": ac, "prediction_type": "v_prediction"})()
    on = objective_for(bundle, None, type("T", (), {"zero_terminal_snr": True})())
    off = objective_for(bundle, None, type("T", (), {})())
    assert torch.equal(on.alphas, z) and torch.equal(off.alphas, ac)
    assert float(on._scheduler(4).alphas_cumprod[-1]) == pytest.approx(ZERO_TERMINAL_ALPHA, rel=1e-4)


def test_shifts_match_their_definitions() -> None:
    s = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(time_shift(s, 3.0), 3 * s / (1 + 2 * s))
    assert torch.equal(time_shift(s, 1.0), s)
    # Flux: 0.5 at 256 tokens, 1.15 at 4096 (1024x1024 images are 64x64 patches = 4096 tokens).
    spec = ObjectiveSpec(kind="flow", resolution_shift=True)
    assert resolution_mu(256, spec) == pytest.approx(0.5)
    assert resolution_mu(4096, spec) == pytest.approx(1.15)
    mu = resolution_mu(4096, spec)
    assert torch.allclose(exponential_shift(s, mu), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))
    # A shift above 1 moves sigmas toward noise, as SD3/Flux train at high resolution.
    assert bool((time_shift(s, 3.0) > s).all())


def test_logit_normal_sigmas_stay_inside_zero_one_and_center_on_half() -> None:
    spec = ObjectiveSpec(kind="flow", sampling="logit_normal")
    latents = torch.zeros(4096, 16, 8, 8)
    sig = FlowObjective(spec, torch.device("cpu")).sample_sigmas(4096, torch.Generator().manual_seed(0), latents)
    assert bool(((sig > 0) & (sig < 1)).all())
    assert sig.median().item() == pytest.approx(0.5, abs=0.03)


class _ExactVelocity:
    """A 'model' that predicts the true velocity toward a known x0: Euler must land on x0."""

    dtype = torch.float32

    def __init__(self, x0: torch.Tensor, noise: torch.Tensor) -> None:
        self.x0, self.noise = x0, noise

    def predict(self, x, t, cond, size):  # noqa: ANN001, ANN201
        return (self.noise - self.x0).expand_as(x)


@pytest.mark.parametrize("cfg_sampling", [True, False])
def test_flow_sampler_follows_the_velocity_from_noise_to_the_image(cfg_sampling: bool) -> None:
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    spec = ObjectiveSpec(kind="flow", shift=3.0, cfg_sampling=cfg_sampling, guidance_input=not cfg_sampling)
    obj = FlowObjective(spec, torch.device("cpu"))
    out = obj.denoise(_ExactVelocity(x0, noise), obj.initial_latents(noise, 6), {}, None, 6, 4.0,
                      lambda: torch.autocast("cpu", enabled=False))
    assert torch.allclose(out, x0, atol=1e-5)
    sig = obj.schedule(6, noise)
    assert sig[0].item() == pytest.approx(1.0) and sig[-1].item() == 0.0
    assert bool((sig[1:] < sig[:-1]).all())


def test_every_family_answers_the_family_questions() -> None:
    for name in ("sd1", "sd2", "sdxl"):
        fam = get_family(name)
        assert fam.name == name and fam.label
        assert fam.objective.kind == "ddpm"
        assert fam.base_model_version("epsilon") and fam.modelspec_architecture("epsilon")
    assert get_family("sdxl").uses_size_info and not get_family("sd1").uses_size_info
    from lora_trainer.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="model.arch 'sd9'.*sd1"):
        get_family("sd9")
