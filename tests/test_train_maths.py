"""The training maths as pure functions, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.config import OptimConfig
from lora_trainer.errors import ConfigError
from lora_trainer.train import losses
from lora_trainer.train.optim import build_optimizer
from lora_trainer.train.schedules import lr_at, make_scheduler

# (step, total, warmup, kind, cycles, expected lr for base 1.0)
LR_TABLE = [
    (0, 10, 0, "constant", 1, 1.0),
    (9, 10, 0, "constant", 1, 1.0),
    (0, 10, 3, "constant", 1, 0.25),
    (2, 10, 3, "constant", 1, 0.75),
    (3, 10, 3, "constant", 1, 1.0),
    (0, 10, 0, "linear", 1, 1.0),
    (5, 10, 0, "linear", 1, 0.5),
    (3, 10, 3, "linear", 1, 1.0),
    (10, 10, 3, "linear", 1, 0.0),
    (1, 10, 1, "linear", 1, 1.0 - 0 / 9),
    (2, 10, 1, "linear", 1, 1.0 - 1 / 9),
    (0, 10, 0, "cosine", 1, 1.0),
    (5, 10, 0, "cosine", 1, 0.5),
    (10, 10, 0, "cosine", 1, 0.0),
    (1, 4, 0, "cosine", 1, 0.5 * (1 + math.cos(math.pi / 4))),
    (0, 10, 0, "cosine_with_restarts", 2, 1.0),
    (5, 10, 0, "cosine_with_restarts", 2, 1.0),  # second cycle restarts at full lr
    (4, 12, 0, "cosine_with_restarts", 3, 1.0),
    (2, 12, 0, "cosine_with_restarts", 3, 0.5),  # half-way through the first of 3 cycles
    (7, 10, 0, "cosine_with_restarts", 2, 0.5 * (1 + math.cos(math.pi * 0.4))),
    (1, 12, 2, "cosine_with_restarts", 1, 2 / 3),
    (12, 12, 2, "cosine_with_restarts", 2, 0.0),
]


@pytest.mark.parametrize("step,total,warmup,kind,cycles,expected", LR_TABLE)
def test_lr_at_table(step: int, total: int, warmup: int, kind: str, cycles: int, expected: float) -> None:
    assert lr_at(step, 1.0, total, warmup, kind, cycles) == pytest.approx(expected, abs=1e-12)
    assert lr_at(step, 3e-4, total, warmup, kind, cycles) == pytest.approx(3e-4 * expected, abs=1e-15)


def test_polynomial_decays_with_its_power_after_the_warmup() -> None:
    """kohya's polynomial schedule (lr_scheduler_power): (1 - progress) ** power to 0; power 1
    is the linear schedule; constant_with_warmup is the constant one (both warm up here)."""
    from lora_trainer.config import load_config

    assert lr_at(5, 1.0, 10, 0, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_at(6, 1.0, 10, 2, "polynomial", power=0.5) == pytest.approx(0.5 ** 0.5)
    assert lr_at(0, 1.0, 10, 2, "polynomial", power=2.0) == pytest.approx(1 / 3)  # warming up
    linear = [lr_at(k, 1.0, 10, 1, "linear") for k in range(11)]
    assert [lr_at(k, 1.0, 10, 1, "polynomial") for k in range(11)] == linear
    o = load_config(None, ["lr_scheduler=polynomial", "lr_scheduler_power=2"]).optim
    assert (o.lr_scheduler, o.lr_scheduler_power) == ("polynomial", 2.0)
    assert load_config(None, ["lr_scheduler=constant_with_warmup"]).optim.lr_scheduler == "constant"


def test_lr_at_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="cosine"):
        lr_at(0, 1.0, 10, 0, "exponential")


def test_scheduler_follows_lr_at_per_group() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 5e-4}], lr=1.0)
    sched = make_scheduler(opt, total_steps=8, warmup=2, kind="cosine")
    for step in range(8):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == pytest.approx(lr_at(step, 1e-3, 8, 2, "cosine"))
        assert lrs[1] == pytest.approx(lr_at(step, 5e-4, 8, 2, "cosine"))
        opt.step()
        sched.step()


def _ac() -> torch.Tensor:
    return torch.tensor([0.9, 0.5, 0.2, 0.01], dtype=torch.float32)


def test_q_sample_and_v_target_by_hand() -> None:
    x0 = torch.full((2, 1, 1, 1), 2.0)
    noise = torch.full((2, 1, 1, 1), -1.0)
    t = torch.tensor([1, 2])
    # a=0.5: sqrt(.5)*2 + sqrt(.5)*-1 = 0.7071; a=0.2: sqrt(.2)*2 + sqrt(.8)*-1 = -0.0000 (0.8944-0.8944)
    q = losses.q_sample(x0, noise, t, _ac()).flatten()
    assert q[0].item() == pytest.approx(math.sqrt(0.5) * 2 - math.sqrt(0.5), abs=1e-6)
    assert q[1].item() == pytest.approx(math.sqrt(0.2) * 2 - math.sqrt(0.8), abs=1e-6)
    v = losses.v_target(x0, noise, t, _ac()).flatten()
    assert v[0].item() == pytest.approx(math.sqrt(0.5) * -1 - math.sqrt(0.5) * 2, abs=1e-6)
    assert v[1].item() == pytest.approx(math.sqrt(0.2) * -1 - math.sqrt(0.8) * 2, abs=1e-6)
    assert torch.equal(losses.target_for("epsilon", x0, noise, t, _ac()), noise)
    assert torch.equal(losses.target_for("v_prediction", x0, noise, t, _ac()), losses.v_target(x0, noise, t, _ac()))


def test_v_target_identity_recovers_x0() -> None:
    # x0 = sqrt(a) x_t - sqrt(1-a) v holds for any a: a check that q_sample and v agree.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([0, 500, 999])
    xt, v = losses.q_sample(x0, noise, t, ac), losses.v_target(x0, noise, t, ac)
    a = ac[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * xt - (1 - a).sqrt() * v, x0, atol=1e-5)


def test_snr_and_min_snr_weights_by_hand() -> None:
    t = torch.tensor([0, 1, 3])
    snr = losses.snr(t, _ac())
    assert snr.tolist() == pytest.approx([9.0, 1.0, 0.01 / 0.99], rel=1e-5)
    eps = losses.min_snr_weights(t, _ac(), gamma=5.0, prediction_type="epsilon")
    assert eps.tolist() == pytest.approx([5.0 / 9.0, 1.0, 1.0], rel=1e-5)
    v = losses.min_snr_weights(t, _ac(), gamma=5.0, prediction_type="v_prediction")
    assert v.tolist() == pytest.approx([5.0 / 10.0, 1.0 / 2.0, (0.01 / 0.99) / (0.01 / 0.99 + 1)], rel=1e-5)


def test_offset_noise_adds_a_per_channel_constant() -> None:
    lat = torch.zeros(2, 4, 8, 8)
    plain = losses.offset_noise(lat, 0.0, torch.Generator().manual_seed(1))
    again = losses.offset_noise(lat, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(plain, again)
    off = losses.offset_noise(lat, 0.5, torch.Generator().manual_seed(1))
    delta = off - plain  # same base draw, then the offset
    assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta))
    assert delta.abs().sum() > 0


def test_offset_noise_random_and_adaptive_strength() -> None:
    """kohya's noise_offset_random_strength draws the batch's strength in [0, offset) from the
    run's generator; adaptive_noise_scale adds that multiple of each channel's |latent mean| to
    it (kept at 0 or more). Off, the draws are the same as before."""
    lat = torch.zeros(2, 4, 8, 8)
    lat[:, 1] = 2.0  # channel 1 has mean 2, the others 0
    lat[:, 2] = -1.0
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    base = torch.randn(lat.shape, generator=gen())
    g = gen()
    torch.randn(lat.shape, generator=g)
    strength = 0.5 * float(torch.rand((), generator=g))
    unit = torch.randn((2, 4, 1, 1), generator=g)
    rand = losses.offset_noise(lat, 0.5, gen(), random_strength=True)
    assert 0 < strength < 0.5
    assert torch.allclose(rand, base + strength * unit)
    adaptive = losses.offset_noise(lat, 0.1, gen(), adaptive_scale=0.25)
    g = gen()
    torch.randn(lat.shape, generator=g)
    unit = torch.randn((2, 4, 1, 1), generator=g)
    scale = torch.tensor([0.1, 0.1 + 0.25 * 2.0, 0.1 + 0.25 * 1.0, 0.1]).view(1, 4, 1, 1)
    assert torch.allclose(adaptive, base + scale * unit)
    negative = losses.offset_noise(lat, 0.1, gen(), adaptive_scale=-0.25)  # 0.1 - 0.5 clamps to 0
    assert torch.allclose(negative[:, 1], base[:, 1]) and not torch.allclose(negative[:, 0], base[:, 0])
    assert torch.equal(losses.offset_noise(lat, 0.5, gen()), losses.offset_noise(lat, 0.5, gen(), False, 0.0))


def test_input_perturbation_adds_fresh_noise_from_the_generator() -> None:
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(5)
    assert losses.perturbed_noise(noise, 0.0, True, g) is None
    assert torch.equal(torch.rand((), generator=g), torch.rand((), generator=torch.Generator().manual_seed(5)))
    xi = torch.randn(noise.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(losses.perturbed_noise(noise, 0.1, False, torch.Generator().manual_seed(5)), noise + 0.1 * xi)
    g = torch.Generator().manual_seed(5)
    gamma = 0.1 * float(torch.rand((), generator=g))
    xi = torch.randn(noise.shape, generator=g)
    assert torch.allclose(losses.perturbed_noise(noise, 0.1, True, torch.Generator().manual_seed(5)),
                          noise + gamma * xi)


def test_huber_thresholds_follow_their_schedules() -> None:
    t = torch.tensor([0, 500, 1000 - 1])
    const = losses.huber_threshold("constant", 0.1, 2.0, t)
    assert const.tolist() == pytest.approx([0.2, 0.2, 0.2])
    exp = losses.huber_threshold("exponential", 0.1, 1.0, t, None, 1000)
    assert exp.tolist() == pytest.approx([1.0, 0.1 ** 0.5, 0.1 ** 0.999], rel=1e-5)
    ac = _ac()  # a_t of 0.9, 0.5, 0.01
    snr_c = losses.huber_threshold("snr", 0.1, 1.0, torch.tensor([0, 1, 3]), ac)
    sigma = torch.tensor([(0.1 / 0.9) ** 0.5, 1.0, (0.99 / 0.01) ** 0.5])
    assert torch.allclose(snr_c, 0.9 / (1 + sigma) ** 2 + 0.1)
    assert snr_c[0] > snr_c[1] > snr_c[2] > 0.1
    with pytest.raises(ValueError, match="snr schedule needs"):
        losses.huber_threshold("snr", 0.1, 1.0, t, None)


def test_loss_types_per_sample() -> None:
    """l2 is weighted_mse bit for bit; l1 the mean |d|; huber 2c(sqrt(d^2 + c^2) - c), squared
    error for |d| << c and 2c|d| - 2c^2 for |d| >> c; smooth_l1 the same over c; each per sample
    with its own c and the per-sample weights."""
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([0.01 * torch.ones(1, 2, 2), 100 * torch.ones(1, 2, 2)])
    w = torch.tensor([1.0, 0.5])
    assert torch.equal(losses.weighted_loss(pred, target, w), losses.weighted_mse(pred, target, w))
    assert losses.weighted_loss(pred, target, w, "l1").item() == pytest.approx((0.01 + 0.5 * 100) / 2)
    c = torch.tensor([1.0, 0.1])
    huber = losses.weighted_loss(pred, target, None, "huber", c)
    small = 2 * 1.0 * ((0.01 ** 2 + 1.0) ** 0.5 - 1.0)  # about 0.01^2
    large = 2 * 0.1 * ((100 ** 2 + 0.01) ** 0.5 - 0.1)  # about 2 * 0.1 * 100
    assert small == pytest.approx(1e-4, rel=1e-3) and large == pytest.approx(20.0, rel=1e-2)
    assert huber.item() == pytest.approx((small + large) / 2, rel=1e-5)
    smooth = losses.weighted_loss(pred, target, None, "smooth_l1", c)
    assert smooth.item() == pytest.approx((small / 1.0 + large / 0.1) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="needs a threshold"):
        losses.weighted_loss(pred, target, None, "huber")


def test_pyramid_noise_adds_coarse_noise_at_unit_scale_and_repeats_from_its_generator() -> None:
    """kohya's multires noise: unit standard deviation, more of its power at coarse scales than
    white noise has (8x8 block means vary more), the same noise from the same generator state,
    and the noise itself with 0 iterations."""
    from lora_trainer.train.losses import pyramid_noise

    white = torch.randn(4, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    assert losses.pyramid_noise(white, 0, 0.3) is white
    a = pyramid_noise(white, 6, 0.5, torch.Generator().manual_seed(1))
    b = pyramid_noise(white, 6, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == white.shape and a.dtype == white.dtype
    assert float(a.std()) == pytest.approx(1.0, abs=1e-4) and not torch.equal(a, white)
    coarse = torch.nn.functional.avg_pool2d
    assert float(coarse(a, 8).std()) > 1.5 * float(coarse(white, 8).std())  # white: 1/8
    assert not torch.equal(a, pyramid_noise(white, 6, 0.5, torch.Generator().manual_seed(2)))


def test_weighted_mse_uses_per_sample_weights() -> None:
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    assert losses.weighted_mse(pred, target).item() == pytest.approx((1 + 4) / 2)
    w = torch.tensor([1.0, 0.25])  # e.g. a regularization image with prior_loss_weight 0.25
    assert losses.weighted_mse(pred, target, w).item() == pytest.approx((1 + 1) / 2)



def test_a_mask_weights_the_elementwise_loss_before_the_mean_over_every_element() -> None:
    """alpha_mask: kohya's masked loss, the elementwise loss times the (B, 1, H, W) mask broadcast
    over the channels, then the mean over all elements (not over the mask's area), per sample,
    weighted; every loss type. Without a mask the loss is bit for bit the one computed before."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    mask = torch.rand(2, 1, 3, 5, generator=g)
    mask[0, 0, :, :2] = 0.0
    w, c = torch.tensor([1.0, 0.25]), torch.tensor([0.5, 2.0])
    diff = pred - target
    hand = {"l2": diff ** 2, "l1": diff.abs(),
            "huber": 2 * c.view(-1, 1, 1, 1) * (torch.sqrt(diff ** 2 + c.view(-1, 1, 1, 1) ** 2) - c.view(-1, 1, 1, 1))}
    for kind, elementwise in hand.items():
        expected = sum(float(w[b]) * float((elementwise[b] * mask[b]).sum()) / (4 * 3 * 5) for b in range(2)) / 2
        got = losses.weighted_loss(pred, target, w, kind, c, mask=mask)
        assert got.item() == pytest.approx(expected, rel=1e-5), kind
        if kind != "huber":  # l2 and l1 by the very formula they used before masks existed
            assert torch.equal(losses.weighted_loss(pred, target, w, kind, c),
                               (elementwise.flatten(1).mean(dim=1) * w).mean())
        assert torch.allclose(losses.weighted_loss(pred, target, w, kind, c, mask=torch.ones(2, 1, 3, 5)),
                              losses.weighted_loss(pred, target, w, kind, c))
    assert torch.equal(losses.weighted_mse(pred, target, w), ((pred - target).pow(2).flatten(1).mean(dim=1) * w).mean())
    transparent = torch.zeros(2, 1, 3, 5)
    assert losses.weighted_mse(pred, target, w, transparent).item() == 0.0

def test_optimizer_param_groups_and_missing_packages() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 5e-5}],
                          OptimConfig(), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-5]
    ada = build_optimizer([{"params": [a], "lr": 1e-3}], OptimConfig(optimizer="adafactor"), torch.device("cpu"))
    assert type(ada).__name__ == "Adafactor" and not ada.defaults["relative_step"]  # at the schedule's rate
    assert not ada.defaults["scale_parameter"] and ada.param_groups[0]["lr"] == 1e-3
    for name, package in (("adamw8bit", "bitsandbytes"), ("prodigy", "prodigyopt"), ("lion", "lion-pytorch")):
        try:
            build_optimizer([{"params": [a], "lr": 1.0}], OptimConfig(optimizer=name), torch.device("cpu"))
        except ConfigError as e:
            assert package in str(e) and "pip install" in str(e)
            assert "\n" not in str(e)
    with pytest.raises(ConfigError, match="target_modules"):
        build_optimizer([{"params": [], "lr": 1.0}], OptimConfig(), torch.device("cpu"))


def test_optimizer_args_reach_the_optimizer_and_a_name_it_does_not_take_stops_before_loading(tmp_path) -> None:
    """kohya's optimizer_args: its name=value pairs are the optimizer's keyword arguments, in the
    place of the optim fields (betas as a pair, True, numbers); a name the optimizer does not
    take, or its missing package, is one line from the checks that run before any model loads."""
    from lora_trainer.config import build_config, load_config, optimizer_kwargs
    from lora_trainer.train.preflight import find_problems

    cfg = load_config(None, ['optimizer_args=["weight_decay=0.5", "betas=0.8, 0.95", "amsgrad=True"]'])
    assert cfg.optim.optimizer_args == "weight_decay=0.5 betas=0.8,0.95 amsgrad=True"
    assert optimizer_kwargs(cfg.optim) == {"weight_decay": 0.5, "betas": (0.8, 0.95), "amsgrad": True}
    a = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([{"params": [a], "lr": 1e-3}], cfg.optim, torch.device("cpu"))
    d = opt.defaults
    assert (d["weight_decay"], d["betas"], d["amsgrad"], d["eps"]) == (0.5, (0.8, 0.95), True, 1e-8)
    assert not [p for p in find_problems(cfg, check_model=False) if "optim" in str(p)]
    for values, said in [({"optim.optimizer_args": "d_coef=2"}, "optim.optimizer_args: adamw takes no 'd_coef'; "
                                                                  "it takes lr, betas, eps, weight_decay"),
                         ({"optim.optimizer": "prodigy"}, "optim.optimizer: 'prodigy' needs the package 'prodigyopt'")]:
        problems = [str(p) for p in find_problems(build_config(values), check_model=False) if "optim" in str(p)]
        assert len(problems) == 1 and problems[0].startswith(said), problems
    with pytest.raises(ConfigError, match=r"optimizer_args: 'decouple' is not key=value \(e.g. \"weight_decay=0.1\"\)"):
        load_config(None, ['optimizer_args=["decouple"]'])


def test_adamw_on_the_cpu_is_the_fused_kernel_and_steps_like_the_plain_one() -> None:
    """From torch 2.4 the CPU has the fused AdamW kernel and the optimizer takes it; before (a
    WebUI's torch 2.1.2) it is the plain AdamW. Either way it steps like torch's AdamW."""
    from lora_trainer.torch_compat import fused_adamw_supported

    fused_cpu = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 4)
    assert fused_adamw_supported(torch.device("cpu")) is fused_cpu
    torch.manual_seed(0)
    start = [torch.randn(8, 4), torch.randn(4, 8)]
    grads = [[torch.randn(8, 4), torch.randn(4, 8)] for _ in range(3)]
    cfg = OptimConfig(weight_decay=0.01)

    def run(fused: bool) -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params, "lr": 1e-2}]
        if fused:
            opt = build_optimizer(groups, cfg, torch.device("cpu"))
            assert bool(opt.defaults.get("fused")) is fused_cpu
        else:
            opt = torch.optim.AdamW(groups, lr=1e-2, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                    weight_decay=cfg.weight_decay)
        for gs in grads:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(want, start[0] if want.shape == start[0].shape else start[1])
