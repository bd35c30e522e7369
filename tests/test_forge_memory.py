"""Forge storing the UNet narrower than it computes (``--bf16-unet`` on a CPU, fp16 storage with
fp32 computation on older cards): every layer casts its weights per call, and a backward pass
without gradient checkpointing keeps each layer's cast copy. The host says so (the tab's memory
estimate counts the copies) and turns checkpointing on for the run unless the estimate says it
fits; on the Forge stand-in (tests/forge_stub), whose layers cast per call as Forge's do.
"""

from __future__ import annotations

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


def train_recording(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **extra) -> tuple[list[str], list[int]]:
    """(status lines, block counts each checkpoint_blocks call wrapped) of a run."""
    from lora_trainer.hosts.forge import ForgeHost
    from lora_trainer.train.trainer import Trainer

    wrapped: list[int] = []
    real = live_model.checkpoint_blocks
    monkeypatch.setattr(live_model, "checkpoint_blocks", lambda blocks: wrapped.append(len(blocks)) or real(blocks))
    statuses: list[str] = []

    def seen(ev: TrainEvent) -> None:
        if ev.kind == "status":
            statuses.append(ev.message)

    result = Trainer(config(tmp_path, **extra), host=ForgeHost(), callbacks=[seen]).run()
    assert result.steps == 2
    return statuses, wrapped


def test_a_unet_stored_narrow_trains_with_checkpointing_and_the_run_says_why(env, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.hosts.forge import ForgeHost

    engine = env.shared.sd_model
    unet = engine.forge_objects_original.unet.model.diffusion_model
    assert next(unet.parameters()).dtype == torch.bfloat16
    assert ForgeHost().loaded_model().weights_cast == ("bf16", "fp32")
    before = live_model.state_hash(unet)
    statuses, wrapped = train_recording(tmp_path, monkeypatch)  # train.gradient_checkpointing left off
    why = [s for s in statuses if "gradient checkpointing turned on" in s]
    assert len(why) == 1 and "stores the UNet in bf16 and computes in fp32" in why[0] and "\n" not in why[0]
    assert wrapped and wrapped[0] > 0  # every UNet block ran checkpointed
    assert live_model.state_hash(unet) == before and not any("forward" in vars(m) for m in unet.modules())


def test_a_unet_stored_as_computed_keeps_the_users_setting(forge, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.hosts.forge import ForgeHost

    forge_env.reset(forge, forge.sd1, tmp_path / "Lora")  # fp32 storage and computation
    assert ForgeHost().loaded_model().weights_cast is None
    statuses, wrapped = train_recording(tmp_path, monkeypatch)
    assert wrapped == [] and not any("gradient checkpointing" in s for s in statuses)


def test_on_a_gpu_checkpointing_stays_off_when_the_estimate_with_the_copies_fits(tmp_path: Path) -> None:
    from lora_trainer.hosts.forge import checkpointing_needed

    cfg = config(tmp_path, **{"data.resolution": 512, "train.mixed_precision": "fp16"})
    cuda, cast = torch.device("cuda"), ("bf16", "fp32")
    est = estimate.estimate_peak_memory("sd1", 512, 1, 4, "fp16", weights_cast=cast)
    plain = estimate.estimate_peak_memory("sd1", 512, 1, 4, "fp16")
    assert est.step_gb > plain.step_gb  # the estimate counts the copies (test_bench: by how much)
    # Free memory beside the resident UNet: enough with the copies, then enough only without them.
    enough = next(f / 10 for f in range(10, 400) if estimate.fits_resident(est, f / 10))
    assert checkpointing_needed(cfg, "sd1", cast, cuda, free_gb=lambda d: enough) is None
    short = next(f / 10 for f in range(10, 400) if estimate.fits_resident(plain, f / 10))
    assert short < enough
    why = checkpointing_needed(cfg, "sd1", cast, cuda, free_gb=lambda d: short)
    assert why is not None and f"{short:.1f} GB free" in why
    # Where free memory is not measured (the CPU's RAM, shared with the WebUI): always on.
    assert checkpointing_needed(cfg, "sd1", cast, torch.device("cpu")) is not None


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
