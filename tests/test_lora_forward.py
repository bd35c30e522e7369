"""The lean forward of plain LoRA Linear layers: fewer ops, gradients close to peft's, peft's own
forward for every layer or call it does not cover, and runs that resume and restore exactly."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer

from lora_trainer.bench.opcount import OpCounter
from lora_trainer.torch_compat import autocast_dtype, autocast_supported
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.lora_forward import lean_layers, lean_lora_forward
from lora_trainer.train.speed import LoraWeightsCastOnce, skip_lora_input_casts
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, stopped_and_resumed, tiny_config

BF16 = pytest.mark.skipif(not autocast_supported("cpu", torch.bfloat16), reason="no bf16 autocast on this CPU")


def _lora_mlp(dtype: torch.dtype = torch.float32, dropout: float = 0.0, alpha: float = 3.0) -> torch.nn.Module:
    """Two frozen Linear layers with fp32 LoRA (rank 4, scale alpha / 4), B not zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    model = model.to(dtype).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"], lora_dropout=dropout,
                                       init_lora_weights="gaussian"), model)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
            if "lora_B" in n:
                p.data.normal_(0, 0.5)
            p.requires_grad_(True)
    return model


def _step(model: torch.nn.Module, amp: torch.dtype | None = None, once: LoraWeightsCastOnce | None = None,
          x_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, list[torch.Tensor], OpCounter]:
    """One forward and backward on a (batch, tokens, features) input: loss, LoRA and input grads, op counts."""
    torch.manual_seed(1)
    x = torch.randn(2, 8, 16, dtype=x_dtype or amp or torch.float32, requires_grad=True)
    counter = OpCounter()
    autocast = torch.autocast("cpu", dtype=amp) if amp else contextlib.nullcontext()
    with counter:
        with autocast, once.active() if once else contextlib.nullcontext():
            out = model(x)
        loss = out.double().pow(2).mean()
        loss.backward()
    grads = [p.grad.clone() for n, p in model.named_parameters() if "lora_" in n] + [x.grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, counter


def test_fp32_step_matches_peft_and_dispatches_fewer_ops() -> None:
    model = _lora_mlp()
    loss, grads, peft_ops = _step(model)
    undo = lean_lora_forward(model)
    assert lean_layers(model) == 2
    lean_loss, lean_grads, lean_ops = _step(model)
    # one rounding instead of three: the same up to fp32 rounding
    assert torch.allclose(loss, lean_loss, rtol=1e-6, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads, lean_grads, strict=True))
    # per layer: no scale multiply forward or backward, no separate add; 3 kernels fewer at least
    assert lean_ops.ops["mul"] == peft_ops.ops["mul"] - 4
    assert lean_ops.computing <= peft_ops.computing - 2 * 3, (peft_ops.computing, lean_ops.computing)
    undo()
    assert lean_layers(model) == 0 and all("forward" not in vars(m) for m in model.modules())
    back_loss, back_grads, _ = _step(model)
    assert torch.equal(loss, back_loss) and all(torch.equal(a, b) for a, b in zip(grads, back_grads, strict=True))


@BF16
def test_bf16_step_with_the_other_levers_is_as_close_to_fp64_as_peft() -> None:
    """Under bf16 autocast with both exact levers: fewer kernels, and its error against the same
    step in fp64 is no larger than peft's (one rounding of the sum instead of three)."""
    model = _lora_mlp(torch.bfloat16)
    skip_lora_input_casts(model)
    once = LoraWeightsCastOnce([model], torch.bfloat16)
    loss, grads, peft_ops = _step(model, torch.bfloat16, once)
    undo = lean_lora_forward(model)
    lean_loss, lean_grads, lean_ops = _step(model, torch.bfloat16, once)
    assert lean_ops.casts == peft_ops.casts
    assert lean_ops.computing <= peft_ops.computing - 2 * 3, (peft_ops.computing, lean_ops.computing)
    undo()
    exact = model.double()
    ref_loss, ref_grads, _ = _step(exact, x_dtype=torch.float64)
    for ours, theirs, ref in zip([lean_loss, *lean_grads], [loss, *grads], [ref_loss, *ref_grads], strict=True):
        err_ours, err_peft = (ours.double() - ref).abs().max(), (theirs.double() - ref).abs().max()
        assert err_ours <= 1.5 * err_peft + 1e-3 * ref.abs().max(), (err_ours, err_peft)


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(2)
    with torch.no_grad():
        return model(torch.randn(3, 16))


def test_layers_and_calls_it_does_not_cover_run_peft_forward() -> None:
    with_dropout = _lora_mlp(dropout=0.1)
    lean_lora_forward(with_dropout)
    assert lean_layers(with_dropout) == 0  # dropout: left to peft

    model = _lora_mlp()
    base = _outputs(torch.nn.Sequential(model[0].base_layer, model[1], model[2].base_layer))
    peft_out = _outputs(model)
    lean_lora_forward(model)
    assert lean_layers(model) == 2
    lean_lora_forward(model)  # a second time changes nothing
    assert lean_layers(model) == 2
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for m in layers:  # the sampler's strength 0 and back: the scale is read on every call
        m.set_scale("default", 0.0)
    assert torch.equal(_outputs(model), base)
    for m in layers:
        m.set_scale("default", 1.0)
    assert torch.allclose(_outputs(model), peft_out, rtol=1e-5, atol=1e-6)
    for m in layers:  # disabled adapters: peft's forward, the base layers alone
        m.enable_adapters(False)
    assert torch.equal(_outputs(model), base)
    for m in layers:  # merged into the weights: peft's forward (the update is not added twice)
        m.enable_adapters(True)
        m.merge()
    assert torch.allclose(_outputs(model), peft_out, rtol=1e-5, atol=1e-5)
    for m in layers:
        m.unmerge()
    assert torch.allclose(_outputs(model), peft_out, rtol=1e-5, atol=1e-6)


def test_a_base_output_in_another_dtype_gets_peft_arithmetic_exactly() -> None:
    """bf16 base layers with fp32 LoRA and no autocast: peft adds an fp32 update to a bf16
    result and casts back; the lean forward does the same, bit for bit."""
    model = _lora_mlp(torch.bfloat16)
    torch.manual_seed(2)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        peft_out = model(x)
        lean_lora_forward(model)
        assert lean_layers(model) == 2
        lean_out = model(x)
    assert lean_out.dtype == torch.bfloat16 and torch.equal(peft_out, lean_out)


def test_dora_layers_keep_their_own_forward() -> None:
    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.dora import ColumnDora
    from lora_trainer.lora.inject import inject_lora
    from tests.train_helpers import tiny_bundle

    bundle = tiny_bundle()
    net = inject_lora(bundle, NetworkConfig(type="dora"))
    assert any(isinstance(m, ColumnDora) for m in bundle.unet.modules())
    lean_lora_forward(bundle.unet)
    assert lean_layers(bundle.unet) == 0
    net.remove()


def test_autocast_dtype_reads_the_current_state() -> None:
    assert autocast_dtype("cpu") is None
    if autocast_supported("cpu", torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert autocast_dtype("cpu") == torch.bfloat16
        assert autocast_dtype("cpu") is None


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=4)


RUN = {"train.max_train_steps": 6, "train.batch_size": 2, "data.flip": True, "optim.learning_rate": 5e-3,
       "output.save_precision": "fp32", "output.overwrite": True}


@pytest.mark.parametrize("extra", [
    pytest.param({"train.mixed_precision": "bf16"}, marks=BF16, id="bf16"),
    pytest.param({"train.mixed_precision": "no", "train.gradient_checkpointing": True,
                  "network.train_text_encoder": True, "data.cache_text_embeddings": False},
                 id="fp32-checkpointing-text-encoder"),
])
def test_runs_with_the_lean_forward_resume_exactly_and_restore_the_model(
        tmp_path: Path, data: Path, extra: dict) -> None:
    host = TinyHost("sd1")
    roots = [host.bundle.unet] + [p.module for p in host.bundle.text_encoders]
    before = [{k: v.clone() for k, v in r.state_dict().items()} for r in roots]
    seen: list[tuple[int, int]] = []  # (layers with the lean forward, peft LoRA Linear layers) per step

    def spy(ev: TrainEvent) -> None:
        if ev.kind == "step":
            seen.append((sum(lean_layers(r) for r in roots),
                         sum(type(m) is LoraLinear for r in roots for m in r.modules())))

    cfg = {**RUN, **extra}
    straight = Trainer(tiny_config(data, tmp_path / "a", **cfg), host=host, callbacks=[spy]).run()
    assert len(seen) == 6 and all(lean == layers > 0 for lean, layers in seen), seen

    second = stopped_and_resumed(data, tmp_path / "b", host, **cfg)
    assert second.steps == 6
    a, b = lora_tensors(straight.lora_path), lora_tensors(second.lora_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for root, was in zip(roots, before, strict=True):  # handed back bit for bit, nothing of ours left
        after = root.state_dict()
        assert after.keys() == was.keys() and all(torch.equal(was[k], after[k]) for k in was)
        assert not any(isinstance(m, LoraLayer) or "forward" in vars(m) for m in root.modules())
