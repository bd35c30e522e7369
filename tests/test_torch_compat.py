"""Torch-version differences: the paths the oldest supported torch (2.1, the A1111 WebUI's pin)
takes, emulated on the installed torch, plus a training run on whatever torch is installed (the
WebUI pins check runs this file on torch 2.1.2 itself)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer import torch_compat
from lora_trainer.config import OptimConfig
from lora_trainer.train import optim
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, make_data, tiny_config


def test_version_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, want in [("2.1.2+cu121", (2, 1)), ("2.13.0", (2, 13)), ("2.4.0a0+git1234", (2, 4)), ("3.0.0rc1", (3, 0))]:
        monkeypatch.setattr(torch, "__version__", text)
        assert torch_compat.torch_version() == want


def test_grad_scaler_without_torch_amp_grad_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch < 2.3 has no torch.amp.GradScaler; a run on the CPU must still get a (disabled) scaler.
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    scaler = torch_compat.grad_scaler("cpu", enabled=False)
    assert not scaler.is_enabled()
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.5)
    scaler.scale((p * 2).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.zeros(2))
    assert scaler.state_dict() == {}


def test_fused_adamw_only_where_torch_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 1))
    assert not torch_compat.fused_adamw_supported(cpu) and torch_compat.fused_adamw_supported(cuda)
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 4))
    assert torch_compat.fused_adamw_supported(cpu)
    assert not torch_compat.fused_adamw_supported(torch.device("meta"))


def _groups() -> list[dict]:
    return [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": 0.1},
            {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.01}]


def test_adamw_on_old_torch_is_not_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_compat, "torch_version", lambda: (2, 1))
    opt = optim.build_optimizer(_groups(), OptimConfig(), torch.device("cpu"))
    assert not any(g.get("fused") for g in opt.param_groups)


def test_a_refused_fused_adamw_leaves_the_groups_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch fills the group dicts (``fused: True``) before it refuses fused parameters; the
    fallback must not inherit that, or its first step calls the fused kernel anyway."""
    real = torch.optim.AdamW

    class RefusesFused(real):  # type: ignore[misc, valid-type]
        def __init__(self, params, *args, fused=None, **kwargs):
            super().__init__(params, *args, fused=fused, **kwargs)
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")

    monkeypatch.setattr(optim, "fused_adamw_supported", lambda device: True)
    monkeypatch.setattr(torch.optim, "AdamW", RefusesFused)
    groups = _groups()
    opt = optim.build_optimizer(groups, OptimConfig(), torch.device("cpu"))
    assert not any(g.get("fused") for g in opt.param_groups)
    assert not any(g.get("fused") for g in groups)
    sum(p.sum() for g in groups for p in g["params"]).backward()
    opt.step()
    assert all(not torch.equal(p.detach(), torch.ones_like(p)) for g in groups for p in g["params"])


def test_training_steps_on_this_torch(tmp_path: Path) -> None:
    """Two steps, a checkpoint, then a resume to step 3: on torch 2.1.2 this died at the first
    step (torch.amp.GradScaler, then the fused CPU AdamW)."""
    data = make_data(tmp_path / "data", n=2)
    host = TinyHost("sd1")
    cfg = tiny_config(data, tmp_path / "out", **{"train.save_steps": 2})
    first = Trainer(cfg, host=host).run()
    assert first.steps == 2 and first.lora_path is not None and first.lora_path.exists()
    resumed = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 3, "train.resume": "latest"}),
                      host=host).run()
    assert resumed.steps == 3 and resumed.final_loss == resumed.final_loss


def test_checkpointing_runs_on_meta_tensors_for_the_estimate() -> None:
    """The memory estimate traces a checkpointed step on meta; torch 2.1 (A1111's) needs the
    shim for that, newer torch none. torch is left as it was."""
    import torch.utils.checkpoint as tuc

    from lora_trainer.torch_compat import meta_checkpointing

    had = hasattr(torch, "meta")
    weight = torch.empty(8, 8, device="meta", requires_grad=True)
    x = torch.empty(4, 8, device="meta")
    with meta_checkpointing():
        out = tuc.checkpoint(lambda t: (t @ weight).relu(), x, use_reentrant=False, preserve_rng_state=False)
        out.sum().backward()
    assert weight.grad is not None and weight.grad.shape == (8, 8) and weight.grad.device.type == "meta"
    assert hasattr(torch, "meta") == had
