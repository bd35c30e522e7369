"""Forge storing the UNet narrower than it computes (``--bf16-unet`` on a CPU, fp16 storage with
fp32 computation on older cards): every layer casts its weights per call, and a backward pass
would keep each layer's cast copy. Without checkpointing each layer casts again in the backward
pass instead (train/recast.py): the same gradients, none of the copies kept; the tab's memory
estimate traces that. On the Forge stand-in (tests/forge_stub), whose layers cast per call as
Forge's do.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import forge_env
import pytest
import torch

from lora_trainer.bench import estimate
from lora_trainer.config import build_config
from lora_trainer.hosts import live_model
from lora_trainer.train.events import TrainEvent


@pytest.fixture
def env(forge, tmp_path: Path):
    if not hasattr(forge, "sd1_bf16"):
        with torch.inference_mode():  # Forge Neo loads checkpoints in inference mode
            forge.sd1_bf16 = forge.tiny_forge.StableDiffusion(seed=5, name="tiny-bf16", storage_dtype=torch.bfloat16)
    forge_env.reset(forge, forge.sd1_bf16, tmp_path / "Lora")
    return forge


def config(tmp_path: Path, **extra):
    from lora_trainer.data.demo import make_demo_dataset

    values = {
        "data.train_data_dir": str(make_demo_dataset(tmp_path / "data", n=2)), "data.resolution": 64,
        "data.enable_buckets": False, "data.min_image_size": 16, "data.cache_latents": "off",
        "network.rank": 4, "network.alpha": 2.0, "train.max_train_steps": 2, "train.batch_size": 1,
        "output.output_dir": str(tmp_path / "out"), "output.output_name": "lt_cast", "output.tensorboard": False,
    }
    return build_config({**values, **extra})


def train_recording(tmp_path: Path, **extra) -> tuple[list[str], list[int]]:
    """(status lines, blocks checkpointed at each step) of a run."""
    from lora_trainer.hosts.forge import ForgeHost
    from lora_trainer.train import checkpointing
    from lora_trainer.train.trainer import Trainer

    statuses: list[str] = []
    checkpointed: list[int] = []

    def seen(ev: TrainEvent) -> None:
        if ev.kind == "status":
            statuses.append(ev.message)
        elif ev.kind == "step":
            checkpointed.append(checkpointing.count(forge_unet()))

    result = Trainer(config(tmp_path, **extra), host=ForgeHost(), callbacks=[seen]).run()
    assert result.steps == 2
    return statuses, checkpointed


def _run(tmp_path: Path, name: str, **extra) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(the LoRA's tensors, layers recasting at each step) of a 2-step run on the loaded engine."""
    from lora_trainer.hosts.forge import ForgeHost
    from lora_trainer.lora.files import read_lora_file
    from lora_trainer.train.recast import recasting
    from lora_trainer.train.trainer import Trainer

    recasts: list[int] = []
    unet = forge_unet()

    def seen(ev: TrainEvent) -> None:
        if ev.kind == "step":
            recasts.append(recasting(unet))

    cfg = config(tmp_path / name, **{"output.save_precision": "fp32", **extra})
    result = Trainer(cfg, host=ForgeHost(), callbacks=[seen]).run()
    assert result.steps == 2
    return read_lora_file(result.lora_path)[0], recasts


def forge_unet() -> torch.nn.Module:
    from modules import shared

    return shared.sd_model.forge_objects_original.unet.model.diffusion_model


def test_a_unet_stored_narrow_recasts_in_the_backward_pass_with_the_same_gradients(
        env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.hosts import forge as forge_host
    from lora_trainer.hosts.forge import ForgeHost

    unet = forge_unet()
    assert next(unet.parameters()).dtype == torch.bfloat16
    assert ForgeHost().loaded_model().weights_cast == ("bf16", "fp32")
    assert ForgeHost().loaded_model().compute_dtype == "fp32"  # the presets' autocast: the card's choice
    layers = forge_host.cast_per_call_layers(unet)
    assert layers and all(m.parameters_manual_cast for m in layers)
    before = live_model.state_hash(unet)
    statuses, checkpointed = train_recording(tmp_path / "r")  # train.gradient_checkpointing left off
    assert checkpointed == [0, 0] and not any("checkpointing" in s for s in statuses)  # no recomputation
    recast, per_step = _run(tmp_path, "recast")
    norms = [m for m in layers if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and per_step == [len(layers) - len(norms)] * 2  # every cast-per-call layer but the norms, every step
    assert live_model.state_hash(unet) == before and not any("forward" in vars(m) for m in unet.modules())
    # without the recast: the same LoRA bit for bit (the recast copy is the same copy)
    monkeypatch.setattr(forge_host, "recast_in_backward", lambda layers: None)
    kept, _ = _run(tmp_path, "kept")
    assert kept.keys() == recast.keys() and all(torch.equal(kept[k], recast[k]) for k in kept)
    # Forge's weight casts between forward and backward: each kept by autograd, unless recast
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    assert _casts_alive_after_forward(linears, monkeypatch, recast=False) == len(linears)
    assert _casts_alive_after_forward(linears, monkeypatch, recast=True) == 0


def test_with_a_share_of_blocks_checkpointed_the_layers_outside_them_recast_for_the_same_lora(
        env, tmp_path: Path) -> None:
    from lora_trainer.hosts import forge as forge_host
    from lora_trainer.train import checkpointing

    unet = forge_unet()
    layers = forge_host.cast_per_call_layers(unet)
    outside = [m for m in checkpointing.outside_checkpointed(unet, 0.5, layers)
               if not isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]  # norms: train/norms.py
    assert 0 < len(outside) < len(layers)
    plain, _ = _run(tmp_path, "plain")
    half, per_step = _run(tmp_path, "half", **{"train.gradient_checkpointing": True, "train.checkpointing_share": 0.5})
    assert per_step == [len(outside)] * 2  # inside a checkpointed block the recomputation keeps one block's copies
    assert half.keys() == plain.keys() and all(torch.equal(half[k], plain[k]) for k in plain)
    assert not any("forward" in vars(m) for m in unet.modules())


def _casts_alive_after_forward(layers: list[torch.nn.Module], monkeypatch: pytest.MonkeyPatch,
                               recast: bool) -> int:
    """How many of the layers' fp32 weight casts are still alive after a forward through each
    (with a gradient to take), before the backward pass."""
    from backend import operations

    from lora_trainer.train.recast import recast_in_backward

    casts: list[weakref.ref] = []
    cast = operations._cast

    def recording(t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        c = cast(t, x)
        if t is not None and t.dim() == 2:  # the weights (biases are not saved for the backward)
            casts.append(weakref.ref(c))
        return c

    monkeypatch.setattr(operations, "_cast", recording)
    was = {p: p.requires_grad for m in layers for p in m.parameters()}
    for p in was:  # frozen, as during a run
        p.requires_grad_(False)
    undo = recast_in_backward(layers) if recast else (lambda: None)
    try:
        outs = [m(torch.randn(2, m.in_features, requires_grad=True)) for m in layers]
        alive = sum(ref() is not None for ref in casts)
        sum(o.sum() for o in outs).backward()
    finally:
        undo()
        monkeypatch.setattr(operations, "_cast", cast)
        for p, before in was.items():
            p.requires_grad_(before)
    assert len(casts) == len(layers)
    return alive


def test_a_unet_stored_as_computed_keeps_the_users_setting(forge, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.hosts.forge import ForgeHost

    forge_env.reset(forge, forge.sd1, tmp_path / "Lora")  # fp32 storage and computation
    assert ForgeHost().loaded_model().weights_cast is None
    statuses, checkpointed = train_recording(tmp_path)
    assert checkpointed == [0, 0] and not any("gradient checkpointing" in s for s in statuses)


def test_the_estimate_counts_no_copies_without_checkpointing_and_one_blocks_with_it() -> None:
    cast = ("bf16", "fp32")
    plain = estimate.trace_step("sd1", 256, 1, 4, "fp32", False, size="tiny", device="cpu")
    recast = estimate.trace_step("sd1", 256, 1, 4, "fp32", False, size="tiny", device="cpu", weights_cast=cast)
    # the copies are not kept: the step is the plain model's, plus one layer's recast at a time
    assert plain["step"] <= recast["step"] <= plain["step"] * 1.1, (plain, recast)
    # the resident weights are the narrow stored ones
    assert recast["weight_bytes"] < plain["weight_bytes"]


def test_forge_classics_manual_cast_dtype_is_read_too() -> None:
    # Classic's ldm_patched BaseModel has no storage_dtype: the UNet's own weights say it, and
    # manual_cast_dtype (None when it computes in the storage dtype) the computation.
    from types import SimpleNamespace

    from lora_trainer.hosts.forge import unet_weights_cast

    unet = torch.nn.Linear(2, 2).to(torch.float16)
    assert unet_weights_cast(SimpleNamespace(diffusion_model=unet, manual_cast_dtype=torch.float32)) == ("fp16", "fp32")
    assert unet_weights_cast(SimpleNamespace(diffusion_model=unet, manual_cast_dtype=None)) is None
    neo = SimpleNamespace(diffusion_model=unet, storage_dtype="nf4", computation_dtype=torch.bfloat16)
    assert unet_weights_cast(neo) is None  # quantized storage: refused by check_trainable_weights instead
