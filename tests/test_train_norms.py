"""GroupNorm and LayerNorm in the compute dtype under mixed precision (train/norms.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_trainer.bench import estimate
from lora_trainer.bench.livemem import LiveBytes
from lora_trainer.bench.opcount import OpCounter
from lora_trainer.torch_compat import autocast_supported
from lora_trainer.train import norms
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, stopped_and_resumed, tiny_config

needs_cpu_bf16 = pytest.mark.skipif(not autocast_supported("cpu", torch.bfloat16),
                                    reason="this torch has no bf16 autocast on the CPU")


class _Block(nn.Module):
    """A ResNet block's GroupNorm -> SiLU -> conv and a transformer's LayerNorm -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.gn = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.ln = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.silu(self.gn(x)))
        t = h.flatten(2).transpose(1, 2)
        return self.proj(self.ln(t))


def _block(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    block = _Block()
    for m in (block.gn, block.ln):
        nn.init.normal_(m.weight, 1.0, 0.2)
        nn.init.normal_(m.bias, 0.0, 0.2)
    return block.to(device, torch.bfloat16).requires_grad_(False)


def _meta_step(block: nn.Module) -> tuple[OpCounter, int]:
    """One forward and backward on meta under the estimate's stand-in for CUDA bf16 autocast: the
    ops, and the most bytes alive at once."""
    counter = OpCounter()
    with estimate._CudaAutocast(torch.bfloat16), LiveBytes() as live, counter:
        x = torch.empty(2, 16, 8, 8, device="meta", dtype=torch.bfloat16, requires_grad=True)
        block(x).float().pow(2).mean().backward()
    return counter, live.peak


def test_under_cuda_autocast_rules_the_norms_cast_nothing_and_keep_half_the_bytes() -> None:
    block = _block("meta")
    before, before_peak = _meta_step(block)
    undo = norms.norms_in_compute_dtype(block)
    assert norms.count(block) == 2
    after, after_peak = _meta_step(block)
    # per norm: the input to fp32 and back, its weight and bias to fp32, the two gradient casts
    assert before.casts - after.casts >= 2 * 4, (before.casts, after.casts)
    assert after.casts == 2  # the loss's fp32 copy and its gradient back, nothing in the block
    assert after_peak < before_peak
    undo()
    assert norms.count(block) == 0 and not any("forward" in vars(m) for m in block.modules())
    again, _ = _meta_step(block)
    assert again.casts == before.casts


@needs_cpu_bf16
def test_the_forward_computes_what_cpu_autocast_computes(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU autocast leaves the norms in the input's dtype: there the forward (made to act on the
    # CPU for this test) must give the same values and gradients, bit for bit.
    block = _block()

    def step() -> list[torch.Tensor]:
        torch.manual_seed(1)
        x = torch.randn(2, 16, 8, 8, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x)
        out.float().pow(2).mean().backward()
        return [out.detach(), x.grad]

    plain = step()
    monkeypatch.setattr(norms, "UPCASTING", ("cpu",))
    off = norms.autocast_off
    calls: list[str] = []
    monkeypatch.setattr(norms, "autocast_off", lambda device: calls.append(device) or off(device))
    undo = norms.norms_in_compute_dtype(block)
    fast = step()
    assert calls == ["cpu", "cpu"]  # both norms computed by this forward, autocast off
    assert all(torch.equal(a, b) for a, b in zip(plain, fast, strict=True))
    undo()


def test_rounding_stays_that_of_the_compute_dtype() -> None:
    # What the forward changes on a GPU: the norm's output is rounded to bf16 instead of kept in
    # fp32 until the next product. Against fp64, its error stays within bf16's rounding.
    torch.manual_seed(2)
    x = (torch.randn(2, 64, 16, 16) * 3 + 1).bfloat16()
    gn = nn.GroupNorm(8, 64).bfloat16().requires_grad_(False)
    nn.init.normal_(gn.weight, 1.0, 0.2)
    exact = F.silu(F.group_norm(x.double(), 8, gn.weight.double(), gn.bias.double(), gn.eps))
    fp32 = F.silu(F.group_norm(x.float(), 8, gn.weight.float(), gn.bias.float(), gn.eps)).bfloat16()
    low = F.silu(F.group_norm(x, 8, gn.weight, gn.bias, gn.eps))
    ulp = exact.abs().clamp(min=1.0) * 2.0 ** -8
    assert ((low.double() - exact).abs() <= 2 * ulp).all()
    assert ((fp32.double() - exact).abs() <= ulp).all()


def test_trained_norms_norms_kept_in_fp32_and_norms_with_a_forward_of_their_own_keep_theirs() -> None:
    class FP32LayerNorm(nn.LayerNorm):  # as diffusers names its norm that upcasts on purpose
        pass

    block = _block()
    block.ln.requires_grad_(True)
    own = block.gn.forward = lambda x: x  # a host's forward on this layer
    block.extra = FP32LayerNorm(16)
    norms.norms_in_compute_dtype(block)
    assert norms.count(block) == 0 and block.gn.forward is own


def test_a_hosts_cast_per_call_norms_take_this_forward_not_the_recast() -> None:
    # Forge's norms cast their stored weights per call like its linear layers; the recast, which
    # saves the big weights' copies, leaves the norms (a few hundred numbers each) to this forward
    from lora_trainer.train.recast import recast_in_backward, recasting

    block = _block()
    recast_in_backward([block.gn, block.conv, block.ln, block.proj])
    assert recasting(block) == 2
    norms.norms_in_compute_dtype(block)
    assert norms.count(block) == 2


def test_the_estimate_counts_the_norms_as_the_trainer_runs_them() -> None:
    fast = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16")
    fp32 = estimate.estimate_peak_memory("sd1", 512, 1, 16, "bf16", fp32_norms=True)
    assert fp32.fp32_norms and not fast.fp32_norms
    assert fast.step_gb < 0.9 * fp32.step_gb  # the fp32 copies the backward pass no longer keeps
    plain = estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32")
    assert plain.step_gb == estimate.estimate_peak_memory("sd1", 512, 1, 16, "fp32", fp32_norms=True).step_gb


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=4)


FAST = {"train.mixed_precision": "bf16", "train.max_train_steps": 6, "train.batch_size": 2,
        "train.gradient_checkpointing": True, "train.checkpointing_share": 0.5,
        "optim.learning_rate": 5e-3, "output.save_precision": "fp32", "output.overwrite": True}


@needs_cpu_bf16
@pytest.mark.parametrize("fp32_norms", [False, True])
def test_a_run_computes_its_norms_in_bf16_resumes_exactly_and_restores_the_model(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, fp32_norms: bool) -> None:
    monkeypatch.setattr(norms, "UPCASTING", ("cpu",))  # as on a GPU, whose autocast upcasts them
    host = TinyHost("sd1")
    unet = host.bundle.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    seen: list[int] = []

    def spy(ev: TrainEvent) -> None:
        if ev.kind == "step":
            seen.append(norms.count(unet))

    values = {**FAST, "train.fp32_norms": fp32_norms}
    straight = Trainer(tiny_config(data, tmp_path / "a", **values), host=host, callbacks=[spy]).run()
    layers = len(norms.norm_layers(unet))
    assert layers > 10 and seen == [0 if fp32_norms else layers] * 6
    assert norms.count(unet) == 0
    if fp32_norms:
        return
    second = stopped_and_resumed(data, tmp_path / "b", host, **values)
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in unet.modules())
