"""Speed options of the training step: fewer ops per step, the same results bit for bit."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from lora_trainer.bench.opcount import OpCounter
from lora_trainer.torch_compat import autocast_supported
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.speed import LoraWeightsCastOnce, skip_lora_input_casts
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, stopped_and_resumed, tiny_config

pytestmark = pytest.mark.skipif(not autocast_supported("cpu", torch.bfloat16),
                                reason="this torch has no bf16 autocast on the CPU")


def _lora_mlp(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    model = model.to(torch.bfloat16).requires_grad_(False)  # frozen weights in the training dtype
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], lora_dropout=dropout,
                                       init_lora_weights="gaussian"), model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # fp32 LoRA weights, as the trainer keeps them
            p.requires_grad_(True)
    return model


def _peft_has_input_cast_switch() -> bool:
    """peft 0.14+ lets a LoRA layer skip its input cast; before (the A1111 WebUI's peft 0.13.2)
    the input is always cast to the LoRA weights' dtype."""
    return any(hasattr(m, "cast_input_dtype_enabled") for m in _lora_mlp().modules() if isinstance(m, LoraLayer))


def _step(model: torch.nn.Module, once: LoraWeightsCastOnce | None = None,
          checkpointing: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], OpCounter]:
    import contextlib

    import torch.utils.checkpoint as tuc

    torch.manual_seed(1)
    x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    counter = OpCounter()
    with counter, once.active() if once else contextlib.nullcontext():  # forward and backward, as a step
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tuc.checkpoint(model, x, use_reentrant=False) if checkpointing else model(x)
        out.float().pow(2).mean().backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n] + [x.grad]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads, counter


def test_skipping_peft_input_casts_is_exact_and_casts_less() -> None:
    model = _lora_mlp()
    out, grads, plain = _step(model)
    undo = skip_lora_input_casts(model)
    fast_out, fast_grads, fast = _step(model)
    assert torch.equal(out, fast_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, fast_grads, strict=True))
    undo()
    if not _peft_has_input_cast_switch():
        # nothing to switch, and nothing left on the layers (LoraWeightsCastOnce takes these casts)
        assert fast.casts == plain.casts, (plain.casts, fast.casts)
        assert not any(hasattr(m, "cast_input_dtype_enabled") for m in model.modules())
        return
    # peft's bf16 -> fp32 input copy and its backward, per LoRA layer: 2 layers x 2 casts fewer
    assert fast.casts <= plain.casts - 4, (plain.casts, fast.casts)
    assert sum(fast.ops.values()) < sum(plain.ops.values())
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, LoraLayer))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_weights_cast_in_one_kernel_train_exactly(checkpointing: bool) -> None:
    model = _lora_mlp()
    skip_lora_input_casts(model)
    out, grads, plain = _step(model, checkpointing=checkpointing)
    once = LoraWeightsCastOnce([model], torch.bfloat16)
    assert len(once.slots) == 4  # A and B of both layers
    fast_out, fast_grads, fast = _step(model, once, checkpointing)
    assert torch.equal(out, fast_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, fast_grads, strict=True))  # LoRA and input grads
    # 4 weight casts forward and 4 gradient casts backward become one of each; before peft 0.14
    # the layers cast their input to the weights' dtype, bf16 now: per layer, the input's round
    # trip to fp32 (2 casts forward, 2 backward) goes too
    fewer = 6 if _peft_has_input_cast_switch() else 6 + 2 * 4
    if checkpointing:  # the backward pass recomputes the forward with the cast copy: 4 weight casts fewer again
        fewer += 4 if _peft_has_input_cast_switch() else 4 + 2 * 2
    assert fast.casts == plain.casts - fewer, (plain.casts, fast.casts)
    # the model holds its own parameters again, and they are what the optimizer trains
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for n, p in model.named_parameters()
               if "lora_" in n)


def test_layers_with_dropout_keep_their_casts() -> None:
    model = _lora_mlp(dropout=0.1)
    skip_lora_input_casts(model)
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in model.modules() if isinstance(m, LoraLayer))
    assert not LoraWeightsCastOnce([model], torch.bfloat16).slots


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=4)


FAST = {"train.mixed_precision": "bf16", "train.max_train_steps": 6, "train.batch_size": 2,
        "data.flip": True, "train.noise_offset": 0.05, "optim.learning_rate": 5e-3,
        "output.save_precision": "fp32", "output.overwrite": True}


def test_bf16_run_with_speed_options_resumes_exactly_and_restores_the_model(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    passes: list[int] = []
    active = LoraWeightsCastOnce.active

    def counted(self: LoraWeightsCastOnce) -> object:
        passes.append(len(self.slots))
        return active(self)

    monkeypatch.setattr(LoraWeightsCastOnce, "active", counted)
    host = TinyHost("sd1")
    unet = host.bundle.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    casting: list[bool] = []

    def spy(ev: TrainEvent) -> None:
        if ev.kind == "step":
            casting.extend(getattr(m, "cast_input_dtype_enabled", None) for m in unet.modules()
                           if isinstance(m, LoraLayer))

    straight = Trainer(tiny_config(data, tmp_path / "a", **FAST), host=host, callbacks=[spy]).run()
    # the option was on in every LoRA layer (peft before 0.14 has no such switch to turn)
    assert casting and all(c is (False if _peft_has_input_cast_switch() else None) for c in casting)
    assert len(passes) == 6 and all(passes)  # and every step's forward cast the LoRA weights at once

    second = stopped_and_resumed(data, tmp_path / "b", host, **FAST)
    assert second.steps == 6
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the host's model is handed back bit for bit, with no LoRA layer left in it
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, LoraLayer) for m in unet.modules())


@pytest.mark.gpu
def test_the_unet_leaves_the_gpu_while_latents_are_cached_and_comes_back_the_same(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.models.tiny import build_components
    from lora_trainer.train import session

    bundle = bundle_from_diffusers(build_components("sd1"), "sd1", None, torch.device("cuda"), torch.bfloat16, "tiny")
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    params = list(bundle.unet.parameters())
    seen: list[str] = []
    fill = session.fill_latent_cache

    def spy(*args: object) -> None:
        seen.append(next(bundle.unet.parameters()).device.type)
        fill(*args)

    monkeypatch.setattr(session, "fill_latent_cache", spy)
    cfg = tiny_config(data, tmp_path / "out", **{"model.device": "cuda", "train.mixed_precision": "bf16",
                                                 "train.max_train_steps": 2})
    Trainer(cfg, host=TinyHost("sd1", bundle=bundle)).run()
    assert seen == ["cpu"]
    assert list(bundle.unet.parameters()) == params  # the same parameter objects, back on the GPU
    after = bundle.unet.state_dict()
    assert all(after[k].device.type == "cuda" and torch.equal(before[k], after[k]) for k in before)


def test_a_checkpointed_bf16_run_trains_the_same_with_one_cast_of_the_lora_weights_per_step(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The low-precision copy of the LoRA weights stays in the layers through the backward pass,
    where checkpointed blocks recompute their forward with it: the same LoRA, bit for bit, as a
    run in which autocast casts each weight in each pass."""
    import contextlib

    cfg = {**FAST, "train.max_train_steps": 3, "train.gradient_checkpointing": True}
    host = TinyHost("sd1")
    active, backward_inside = LoraWeightsCastOnce.active, []

    @contextlib.contextmanager
    def spied(self: LoraWeightsCastOnce) -> Iterator[None]:
        with active(self):
            yield
            # the step's backward pass ran while the copy was in the layers: the weights have gradients
            backward_inside.append(all(w.grad is not None for _, w in self.slots))

    monkeypatch.setattr(LoraWeightsCastOnce, "active", spied)
    said: list[str] = []
    once = Trainer(tiny_config(data, tmp_path / "a", **cfg), host=host,
                   callbacks=[lambda ev: said.append(ev.message or "")]).run()
    assert any(m.startswith("gradient checkpointing: ") for m in said)  # blocks did recompute
    assert len(backward_inside) == 3 and all(backward_inside)
    monkeypatch.setattr(LoraWeightsCastOnce, "active", lambda self: contextlib.nullcontext())
    per_weight = Trainer(tiny_config(data, tmp_path / "b", **cfg), host=host).run()
    a, b = lora_tensors(once.lora_path), lora_tensors(per_weight.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lora_up" in k and a[k].abs().max() > 0 for k in a)  # trained: the up weights left zero
