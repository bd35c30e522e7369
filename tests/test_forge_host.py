"""The Forge host on the Forge Neo stand-in (tests/forge_stub): tiny SD1/SDXL engines on the real
LDM UNet, LoRAs as patcher patches merged by the memory manager, the Lora extension's cache.

Shows: the bundle is the loaded UNet (no copy); a run trains it in place and leaves it exact
(hash), with Forge's own state (forge_objects, loaded models) as before and a plain render equal
to the one before training; LoRA patches merged by a render are out before training; the file
loads in Forge's loader with every key matched and changes the render; a re-trained file with
the same name is read again; the family decides presets and format; what cannot be trained
(Flux, a quantized UNet, the text encoder) is refused in one line.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import forge_env
import numpy as np
import pytest
import torch

from lora_trainer.config import build_config
from lora_trainer.errors import HostError
from lora_trainer.hosts import live_model
from lora_trainer.train.events import TrainEvent


@pytest.fixture
def env(forge, tmp_path: Path):
    forge_env.reset(forge, forge.sd1, tmp_path / "Lora")
    return forge


def host():
    from lora_trainer.hosts.forge import ForgeHost

    return ForgeHost()


def config(tmp_path: Path, **extra):
    from lora_trainer.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n=2)
    values = {
        "data.train_data_dir": str(data), "data.resolution": 64, "data.enable_buckets": False,
        "data.min_image_size": 16, "data.cache_latents": "off",
        "network.rank": 4, "network.alpha": 2.0, "optim.learning_rate": 5e-2, "optim.lr_scheduler": "constant",
        "train.max_train_steps": 3, "train.batch_size": 1, "output.output_dir": str(tmp_path / "out"),
        "output.output_name": "lt_forge", "output.tensorboard": False,
    }
    values.update(extra)
    return build_config(values)


def kmodel(engine):
    return engine.forge_objects_original.unet.model


def render(env, prompt: str, seed: int = 3) -> np.ndarray:
    [img] = host().render(prompt, "", seed, "", [0.0], 2, 64, 64)
    return np.asarray(img, dtype=np.int16)


def train(env, tmp_path: Path, **extra):
    from lora_trainer.train.trainer import Trainer

    return Trainer(config(tmp_path, **extra), host=host()).run()


def test_the_bundle_is_the_loaded_unet_and_its_outputs_can_be_trained_through(env, tmp_path: Path) -> None:
    engine = env.shared.sd_model
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert bundle.unet is kmodel(engine).diffusion_model and bundle.unet_naming == "ldm"
        assert (bundle.arch, bundle.prediction_type, bundle.text_encoders) == ("sd1", "epsilon", [])
        assert torch.equal(bundle.alphas_cumprod, kmodel(engine).predictor.alphas_cumprod)
        lat = bundle.encode_images(torch.zeros(1, 3, 64, 64))
        cond = bundle.encode_text(["a photo"])
        assert not lat.is_inference() and not cond["context"].is_inference()  # Forge encodes in inference mode
        w = torch.nn.Parameter(torch.ones(()))
        out = bundle.predict(lat * w, torch.tensor([10]), {"context": cond["context"] * w}, None)
        out.sum().backward()  # autograd may save what Forge produced
        assert w.grad is not None and out.shape == lat.shape == (1, 4, 8, 8)
    finally:
        h.release_bundle(bundle)


def test_a_run_trains_in_place_and_leaves_model_forge_state_and_render_exact(env, tmp_path: Path) -> None:
    engine = env.shared.sd_model
    plain = render(env, "a cat")
    before = live_model.state_hash(kmodel(engine))
    objects = engine.forge_objects
    result = train(env, tmp_path)
    assert result.steps == 3 and Path(result.lora_path).parent == tmp_path / "Lora"
    assert live_model.state_hash(kmodel(engine)) == before
    assert engine.forge_objects is objects and not kmodel(engine).diffusion_model.training
    assert not any(type(m).__module__.startswith("peft") for m in kmodel(engine).modules())
    assert not env.call_queue.queue_lock.locked() and env.shared.state.sampling_steps == 3
    assert np.array_equal(render(env, "a cat"), plain)


def test_the_file_loads_in_forges_loader_and_changes_the_render(env, tmp_path: Path) -> None:
    result = train(env, tmp_path)
    name = Path(result.lora_path).stem
    off, on = render(env, f"a cat <lora:{name}:0>"), render(env, f"a cat <lora:{name}:1>")
    assert env.networks.last_unmatched[str(result.lora_path)] == [] and not env.networks.dropped
    assert np.abs(on - off).max() > 0
    assert np.array_equal(off, render(env, "a cat"))
    assert env.main_thread.thread_names and set(env.main_thread.thread_names) == {"forge-main-thread"}


def test_a_lycoris_preset_file_loads_whole_in_forges_loader(env, tmp_path: Path) -> None:
    # LyCORIS' full preset on Forge's UNet: its ResNet blocks, samplers, conv in/out and time embedding too.
    from safetensors import safe_open

    result = train(env, tmp_path, **{"network.lycoris_preset": "full", "network.conv_rank": 2})
    with safe_open(str(result.lora_path), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
            "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_mid_block_resnets_0_conv1"} <= modules
    name = Path(result.lora_path).stem
    off, on = render(env, f"a cat <lora:{name}:0>"), render(env, f"a cat <lora:{name}:1>")
    assert env.networks.last_unmatched[str(result.lora_path)] == [] and not env.networks.dropped
    assert np.abs(on - off).max() > 0


def test_lora_patches_merged_by_a_render_are_out_before_training_and_back_after(env, tmp_path: Path) -> None:
    engine = env.shared.sd_model
    clean = live_model.state_hash(kmodel(engine))
    name = Path(train(env, tmp_path / "first").lora_path).stem
    with_lora = render(env, f"a cat <lora:{name}:1>")
    assert live_model.state_hash(kmodel(engine)) != clean  # Forge merged the patches into the weights
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert live_model.state_hash(kmodel(engine)) == clean
        assert env.memory_management.current_loaded_models == []  # Forge's manager freed everything first
    finally:
        h.release_bundle(bundle)
    assert np.array_equal(render(env, f"a cat <lora:{name}:1>"), with_lora)  # re-merged by Forge


def test_a_retrained_file_with_the_same_name_is_read_again(env, tmp_path: Path) -> None:
    from lora_trainer.lora.files import read_lora_file

    first = train(env, tmp_path / "a", **{"output.output_name": "same"})
    stale = render(env, "a cat <lora:same:1>")
    reads = len(env.networks.reads)
    second = train(env, tmp_path / "b", **{"output.output_name": "same", "output.overwrite": True,
                                            "optim.learning_rate": 0.2, "train.seed": 7})
    assert second.lora_path == first.lora_path
    fresh = render(env, "a cat <lora:same:1>")
    assert len(env.networks.reads) == reads + 1  # the cache by name was dropped
    tensors, _ = read_lora_file(Path(second.lora_path))
    assert np.abs(fresh - stale).max() > 0 and tensors


def test_without_the_refresh_forge_serves_the_stale_file(env, tmp_path: Path) -> None:
    """The stand-in reproduces what the refresh is for: the cache by name and the hash."""
    import shutil

    path = Path(train(env, tmp_path / "a", **{"output.output_name": "stale"}).lora_path)
    other = Path(train(env, tmp_path / "b", **{"output.output_name": "other", "optim.learning_rate": 0.2}).lora_path)
    first = render(env, "a cat <lora:stale:1>")
    # Re-written behind the host's back (no refresh_loras), as every tool writes: a new file
    # renamed over the old one (copying into the same file would change the cached tensors,
    # which safetensors maps from the file).
    shutil.copyfile(other, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    assert np.array_equal(render(env, "a cat <lora:stale:1>"), first)
    host().refresh_loras()
    assert not np.array_equal(render(env, "a cat <lora:stale:1>"), first)


def test_a_run_that_raises_or_is_interrupted_restores_everything(env, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.train import session
    from lora_trainer.train.trainer import Trainer

    engine = env.shared.sd_model
    before = live_model.state_hash(kmodel(engine))

    def interrupt_at_step_2(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            env.shared.state.interrupt()  # Forge's Interrupt button

    result = Trainer(config(tmp_path / "i", **{"train.max_train_steps": 50}), host=host(),
                     callbacks=[interrupt_at_step_2]).run()
    assert result.stopped and result.steps < 50
    monkeypatch.setattr(session.RunSession, "host_interrupted", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train(env, tmp_path / "e")
    assert live_model.state_hash(kmodel(engine)) == before and not env.call_queue.queue_lock.locked()
    assert not any(type(m).__module__.startswith("peft") for m in kmodel(engine).modules())


def test_gradient_checkpointing_on_forges_unet_is_ours_and_undone(env, tmp_path: Path) -> None:
    from lora_trainer.train import checkpointing
    from lora_trainer.train.trainer import Trainer

    engine = env.shared.sd_model
    unet = kmodel(engine).diffusion_model
    units = checkpointing.units(unet)
    assert {type(u).__name__ for u in units} == {"ResBlock", "BasicTransformerBlock"}  # Forge's LDM classes
    before = live_model.state_hash(kmodel(engine))
    during: list[int] = []
    cfg = config(tmp_path, **{"train.gradient_checkpointing": True, "train.checkpointing_share": 0.5})
    result = Trainer(cfg, host=host(), callbacks=[
        lambda ev: during.append(checkpointing.count(unet)) if ev.kind == "step" else None]).run()
    assert result.steps == 3 and live_model.state_hash(kmodel(engine)) == before
    assert during == [round(len(units) / 2)] * 3 and checkpointing.count(unet) == 0
    assert not any("forward" in vars(b) for b in units)


def test_changed_weights_trigger_a_checkpoint_reload(env, tmp_path: Path) -> None:
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    with torch.no_grad():
        next(bundle.unet.parameters()).add_(1.0)  # a bug that touched a base weight
    loads = len(env.sd_models.loads)
    h.release_bundle(bundle)
    assert len(env.sd_models.loads) == loads + 1  # Forge read the checkpoint again


def test_the_checkpoint_is_loaded_when_the_run_starts(env, tmp_path: Path) -> None:
    engine = env.shared.sd_model
    env.sd_models.model_data = env.sd_models.SdModelData()  # selected, never generated with
    env.shared.sd_model = env.sd_models.model_data.sd_model
    env.sd_models.select(engine.sd_checkpoint_info.title, lambda: engine)
    h = host()
    pending = h.loaded_model()
    assert pending.family is None and pending.unsupported is None and "loads it" in pending.label
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert env.shared.sd_model is engine and h.loaded_model().family == "sd1"
    finally:
        h.release_bundle(bundle)


def test_a_checkpoint_forge_has_not_loaded_yet_sizes_the_presets_for_its_family(env, tmp_path: Path) -> None:
    """Before Forge loads the selected checkpoint (first visit, no generation yet) its family comes
    from the file's header, so "auto" and the presets are sized for that model (SDXL: 1024 px),
    with the model's weights counted as not yet in memory; a file whose header does not tell
    (a pickle) leaves the default family."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from lora_trainer.families.sd_detect import SDXL_TE1_KEY, SDXL_TE2_KEY, UNET_IN_KEY
    from lora_trainer.ui.train_section import preset_for_host

    xl = tmp_path / "xl.safetensors"
    save_file({UNET_IN_KEY: torch.zeros(8, 4, 3, 3), SDXL_TE1_KEY: torch.zeros(2, 2),
               SDXL_TE2_KEY: torch.zeros(2, 2)}, str(xl))
    old = tmp_path / "old.ckpt"
    old.write_bytes(b"a pickle is never opened to guess")
    env.sd_models.model_data = env.sd_models.SdModelData()  # selected, never generated with
    env.shared.sd_model = env.sd_models.model_data.sd_model
    h = host()
    for file, family, resolution in ((xl, "sdxl", 1024), (old, None, 512)):
        env.sd_models.select(SimpleNamespace(title=f"{file.name} [0123]", filename=str(file)), None)
        pending = h.loaded_model()
        assert (pending.family, pending.resident, pending.unsupported) == (family, False, None)
        assert pending.label == f"{file.name} [0123] (Forge loads it when the run starts)"
        assert preset_for_host(h, "8 GB", "auto")["data.resolution"] == resolution


def test_what_cannot_be_trained_is_refused_in_one_line(env, tmp_path: Path) -> None:
    flux = env.tiny_forge.Flux()
    forge_env.reset(env, flux, tmp_path / "Lora")
    h = host()
    assert "the loaded model is Flux" in h.loaded_model().unsupported
    with pytest.raises(HostError, match="the loaded model is Flux; lora-trainer trains SD1, SD2 and SDXL") as e:
        h.acquire_bundle(config(tmp_path))
    assert "\n" not in str(e.value) and env.memory_management.events == []  # refused before touching anything
    forge_env.reset(env, env.sd1, tmp_path / "Lora")
    with pytest.raises(HostError, match="network.train_text_encoder"):
        h.acquire_bundle(config(tmp_path, **{"network.train_text_encoder": True}))
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None:
        quantized = env.tiny_forge.StableDiffusion(seed=1, name="tiny-fp8", storage_dtype=fp8)
        forge_env.reset(env, quantized, tmp_path / "Lora")
        with pytest.raises(HostError, match="stored as float8_e4m3fn"):
            h.acquire_bundle(config(tmp_path))
        assert h._lease is None


def test_queue_lock_progress_and_interrupt_are_the_webuis(env) -> None:
    h = host()
    with h.lock():
        assert env.call_queue.queue_lock.acquired_by[-1] == threading.get_ident()
        h.on_event(TrainEvent("step", step=5, total_steps=20, loss=0.25))
        assert (env.shared.state.sampling_step, env.shared.state.sampling_steps) == (5, 20)
        env.shared.state.interrupt()
        assert h.interrupted()
    assert not env.call_queue.queue_lock.locked()


def test_the_webuis_folder_for_temporary_images_exists_before_the_tab_shows_an_image(env, tmp_path: Path) -> None:
    """Gradio saves each new image a gallery shows into the WebUI's ``temp_dir``; Forge Neo's
    default (``<webui>/tmp``) is made only when that setting changes. Found in Forge Neo 2.26: the
    Test section's sweep failed with "No such file or directory: '<webui>/tmp/tmp....png'"."""
    from PIL import Image

    temp = tmp_path / "webui" / "tmp"
    env.shared.opts.data["temp_dir"] = str(temp)
    h = host()
    h.on_event(TrainEvent("step", step=1, total_steps=2, loss=0.5))
    assert not temp.exists()  # made only for images
    h.on_event(TrainEvent("sample", step=1, image=Image.new("RGB", (8, 8))))
    assert temp.is_dir()  # before the Samples gallery shows it
    temp.rmdir()
    render(env, "a cat")
    assert temp.is_dir()  # before the Test section's gallery shows the sweep
    env.shared.opts.data["temp_dir"] = ""  # the system's temp folder: nothing to make
    temp.rmdir()
    render(env, "a cat")
    assert not temp.exists()


class EPS:  # Forge Classic's ldm_patched/modules/model_sampling.py builds its sampler from these
    pass


class V_PREDICTION(EPS):  # noqa: N801 - Forge's class name, matched by name
    pass


class ModelSamplingDiscrete(torch.nn.Module):
    pass


@pytest.mark.parametrize(("base", "expected"), [(EPS, "epsilon"), (V_PREDICTION, "v_prediction")])
def test_forge_classics_schedule_comes_from_its_sampler_class_and_the_ldm_model(base: type, expected: str) -> None:
    """Classic keeps no schedule on its sampler and no prediction_type: the class and the LDM
    model object tell (``alphas_cumprod_original`` wins over a schedule the WebUI replaced)."""
    from types import SimpleNamespace

    from lora_trainer.hosts.forge import schedule_of

    sampling = type("ModelSampling", (ModelSamplingDiscrete, base), {})()
    original = torch.linspace(0.99, 0.01, 1000)
    sd_model = SimpleNamespace(alphas_cumprod_original=original, alphas_cumprod=original.half(), parameterization="eps")
    ac, pred = schedule_of(sd_model, SimpleNamespace(model_sampling=sampling))
    assert pred == expected and torch.equal(ac, original)
    with pytest.raises(HostError, match="not a noise-prediction"):
        schedule_of(SimpleNamespace(), SimpleNamespace(predictor=SimpleNamespace(prediction_type="const")))


def test_forges_in_place_residuals_run_out_of_place_only_during_the_run(env, tmp_path: Path) -> None:
    """Forge's transformer blocks add residuals in place, which breaks the backward pass (seen
    in a real Forge Neo); for the run they compute the same sums out of place."""
    unet = kmodel(env.shared.sd_model).diffusion_model
    blocks = [m for m in unet.modules() if type(m).__module__ == "tiny_forge"]
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        forge_out = unet(x, t, context=ctx)
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert blocks and all("_forward" in vars(b) for b in blocks)
        with torch.no_grad():
            assert torch.equal(unet(x, t, context=ctx), forge_out)
    finally:
        h.release_bundle(bundle)
    assert not any("_forward" in vars(b) for b in blocks)
