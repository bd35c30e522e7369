"""The A1111 host on the WebUI's real LDM classes (tiny SD1), with the v1.10.1 stand-in modules.

Shows: the bundle is the live model (no copy); a Trainer run writes a LoRA into the WebUI's LoRA
folder whose keys all resolve by the WebUI's rule, and the list is refreshed; applied LoRA
deltas are removed before training; state-dict hash, requires_grad flags, dtypes, devices and
train/eval modes are identical before and after a run, also a run stopped midway and one that
raises; --lowvram is refused; --medvram placement is put back.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import a1111_env
import numpy as np
import pytest
import torch

from lora_trainer.config import build_config
from lora_trainer.errors import DeviceMemoryError, HostError
from lora_trainer.hosts import live_model
from lora_trainer.train.events import TrainEvent


@pytest.fixture
def env(webui, tmp_path: Path):
    a1111_env.reset(webui, webui.model, tmp_path / "Lora")
    return webui


@pytest.fixture(scope="module")
def trained(webui, tmp_path_factory: pytest.TempPathFactory):
    """One Trainer run through the A1111 host (shared by the tests that need a LoRA file)."""
    from lora_trainer.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("trained")
    a1111_env.reset(webui, webui.model, tmp / "Lora")
    sd = webui.model
    before = (live_model.state_hash(sd), flags(sd), modes(sd))
    result = Trainer(config(tmp, **{"optim.learning_rate": 5e-2}), host=host()).run()
    after = (live_model.state_hash(sd), flags(sd), modes(sd))
    return {"result": result, "before": before, "after": after, "lora_dir": tmp / "Lora",
            "locked": webui.call_queue.queue_lock.locked(), "state": webui.shared.state,
            "listed": set(webui.networks.available_networks)}


def install_lora(env, trained) -> str:
    """Put the trained file into this test's LoRA folder; returns its network name."""
    src = Path(trained["result"].lora_path)
    dst = Path(env.shared.cmd_opts.lora_dir) / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
    return dst.stem


def flags(model: torch.nn.Module) -> dict:
    return {n: (p.requires_grad, p.dtype, p.device) for n, p in model.named_parameters()}


def modes(model: torch.nn.Module) -> dict:
    return {n: m.training for n, m in model.named_modules()}


def config(tmp_path: Path, **extra):
    from lora_trainer.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n=2)
    values = {
        "data.train_data_dir": str(data), "data.resolution": 64, "data.enable_buckets": False,
        "data.min_image_size": 16, "data.cache_latents": "off",
        "network.rank": 4, "network.alpha": 2.0, "network.train_text_encoder": True,
        "optim.learning_rate": 5e-3, "optim.lr_scheduler": "constant",
        "train.max_train_steps": 3, "train.batch_size": 1, "output.output_dir": str(tmp_path / "out"),
        "output.output_name": "lt_test", "output.tensorboard": False,
    }
    values.update(extra)
    return build_config(values)


def host():
    from lora_trainer.hosts.a1111 import A1111Host

    return A1111Host()


def test_bundle_is_the_live_model_without_copies(env, tmp_path: Path) -> None:
    sd = env.model
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert bundle.unet is sd.model.diffusion_model and bundle.unet_naming == "ldm"
        [te] = bundle.text_encoders
        assert te.module is sd.cond_stage_model.wrapped.transformer and (te.key, te.naming) == ("te", "hf_clip")
        assert bundle.vae is sd.first_stage_model
        assert (bundle.arch, bundle.prediction_type) == ("sd1", "epsilon")
        assert torch.equal(bundle.alphas_cumprod, sd.alphas_cumprod)
        assert not any(p.requires_grad for p in sd.parameters())  # frozen for the run
        lat = bundle.encode_images(torch.zeros(1, 3, 64, 64))
        cond = bundle.encode_text(["a photo"])
        out = bundle.predict(lat, torch.tensor([10]), cond, None)
        assert lat.shape == out.shape == (1, 4, 8, 8) and cond["context"].shape == (1, 77, 32)
        assert bundle.decode_latents(lat).shape == (1, 3, 64, 64)
    finally:
        h.release_bundle(bundle)
    assert all(p.requires_grad for p in sd.parameters())  # as the WebUI left them


def test_training_writes_a_lora_the_webui_resolves_and_leaves_the_model_exact(env, trained) -> None:
    from lora_trainer.lora.files import read_lora_file

    assert trained["after"] == trained["before"]  # state-dict hash, requires_grad, dtypes, devices, modes
    assert not trained["locked"]
    path = Path(trained["result"].lora_path)
    assert path.parent == trained["lora_dir"] and path.name == "lt_test.safetensors"
    assert "lt_test" in trained["listed"]  # the WebUI's list was refreshed by the run
    tensors, meta = read_lora_file(path)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)
    weights = {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")}
    assert weights == {torch.float16}  # output.save_precision: the WebUI casts a LoRA's weights itself
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))  # it learned
    # The WebUI's progress saw the run (3 steps) and the job ended.
    assert trained["state"].sampling_steps == 3 and trained["state"].job == ""
    name = install_lora(env, trained)
    env.networks.load_networks([name])
    net = env.networks.loaded_networks[0]
    assert env.networks.keys_failed_to_match == {}
    assert all("layer_name" in m for m in net.modules.values())
    # Shapes match the layers they resolve to (catches a right-looking name on the wrong layer).
    layers = env.model.network_layer_mapping
    for mod in net.modules.values():
        w = layers[mod["layer_name"]].weight
        assert mod["lora_up.weight"].shape[0] == w.shape[0] and mod["lora_down.weight"].shape[1] == w.shape[1]


def test_captions_reach_the_webui_as_plain_text_unless_weighted(env, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The WebUI reads what it is given as a prompt: a caption's brackets are escaped for it,
    unless data.weighted_captions asks for its emphasis."""
    sd = env.model
    seen: list[list[str]] = []
    real = sd.get_learned_conditioning
    monkeypatch.setattr(sd, "get_learned_conditioning", lambda texts: seen.append(list(texts)) or real(texts),
                        raising=False)
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        bundle.encode_text(["saber (fate), [red]", "a \\ b"])
        bundle.encode_weighted(["saber (fate:1.2)"])
    finally:
        h.release_bundle(bundle)
    assert seen == [["saber \\(fate\\), \\[red\\]", "a \\\\ b"], ["saber (fate:1.2)"]]


@pytest.mark.parametrize("typ", ["loha", "lokr"])
def test_on_the_cpu_lycoris_files_are_written_in_fp32_the_webui_can_apply(env, tmp_path: Path, typ: str) -> None:
    """A1111's LoHa/LoKr modules multiply the file's factors in the file's dtype: on the CPU
    (torch has no fp16 matrix product there) an fp16 file would not apply at all."""
    from modules import devices

    from lora_trainer.lora.files import read_lora_file
    from lora_trainer.train.trainer import Trainer

    assert devices.device.type == "cpu"
    said: list[str] = []
    result = Trainer(config(tmp_path, **{"network.type": typ, "train.max_train_steps": 1,
                                         "network.train_text_encoder": False}), host=host(),
                     callbacks=[lambda ev: said.append(ev.message) if ev.kind == "status" else None]).run()
    tensors, _ = read_lora_file(result.lora_path)
    assert {v.dtype for v in tensors.values()} == {torch.float32}
    assert any(f"written in fp32, not fp16: on the CPU this WebUI cannot apply {typ} weights" in m for m in said)


def test_render_uses_webui_txt2img_with_the_lora(env, trained) -> None:
    name = install_lora(env, trained)
    h = host()
    imgs = h.render("a photo", "", 7, name, [0.0, 1.0], 2, 64, 64)
    assert len(imgs) == 2 and imgs[0].size == (64, 64)
    assert env.processing.history[-1].endswith(f"<lora:{name}:1>")
    diff = np.abs(np.asarray(imgs[0], dtype=np.int16) - np.asarray(imgs[1], dtype=np.int16))
    assert diff.max() > 0  # the LoRA changed the picture
    assert not env.call_queue.queue_lock.locked()


def test_a_render_is_a_webui_job_that_an_old_interrupt_does_not_stop(env, trained) -> None:
    """The Test section's render is a job of the WebUI's own, as its txt2img runs one: its
    progress shows it, an Interrupt left from an earlier generation does not blank it (the
    WebUI's sampling loop renders nothing while one is set), and an Interrupt during it ends it
    with one line."""
    from lora_trainer.hosts.a1111 import A1111Host

    name = install_lora(env, trained)
    seen = []

    class Seen(A1111Host):
        def process(self, p):
            seen.append((env.shared.state.job, env.shared.state.job_count))
            return super().process(p)

    env.shared.state.interrupt()  # pressed on a txt2img earlier
    imgs = Seen().render("a photo", "", 7, name, [0.0, 1.0], 2, 64, 64)
    assert len(imgs) == 2 and seen == [("lora_trainer_test", 2)] * 2
    assert env.shared.state.job == "" and not env.call_queue.queue_lock.locked()

    class InterruptedAfterOne(A1111Host):
        def process(self, p):
            res = super().process(p)
            env.shared.state.interrupt()  # the WebUI's Interrupt, pressed during the first image
            return res

    with pytest.raises(HostError, match="interrupted after 1 of 2 image"):
        InterruptedAfterOne().render("a photo", "", 7, name, [0.0, 1.0], 2, 64, 64)
    assert env.shared.state.job == "" and not env.call_queue.queue_lock.locked()


def test_a_retrained_lora_is_not_served_stale(env, trained) -> None:
    name = install_lora(env, trained)
    path = Path(env.shared.cmd_opts.lora_dir) / f"{name}.safetensors"
    env.networks.load_networks([name])
    reads = env.networks.load_count
    # A re-run writes the file again (atomically: a new file, a new mtime).
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    host().refresh_loras()
    env.networks.load_networks([name])
    assert env.networks.load_count == reads + 1


def _apply_lora(env, trained) -> str:
    """Generate with the trained LoRA so the WebUI merges it into the live weights."""
    name = install_lora(env, trained)
    p = env.processing.StableDiffusionProcessingTxt2Img(prompt=f"x <lora:{name}:1>", seed=1, steps=1,
                                                         width=64, height=64)
    env.processing.process_images(p)
    return name


def test_applied_lora_deltas_are_removed_before_training(env, trained, tmp_path: Path) -> None:
    sd = env.model
    checkpoint = live_model.state_hash(sd)
    _apply_lora(env, trained)
    assert live_model.state_hash(sd) != checkpoint  # the WebUI merged the LoRA into the weights
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    try:
        assert live_model.state_hash(sd) == checkpoint
        assert env.networks.loaded_networks == []
        assert not any(getattr(m, "network_weights_backup", None) is not None for m in sd.modules())
    finally:
        h.release_bundle(bundle)
    assert live_model.state_hash(sd) == checkpoint


def test_a_run_that_raises_restores_everything(env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.train import session
    from lora_trainer.train.trainer import Trainer

    sd = env.model
    before = (live_model.state_hash(sd), flags(sd), modes(sd))
    calls = {"n": 0}

    def boom(self, *a, **k):
        calls["n"] += 1
        raise RuntimeError("CUDA out of memory (simulated)")

    # Fail inside the loop, after LoRA layers are in and a step has run; the run says it in one
    # line naming the settings to change.
    monkeypatch.setattr(session.RunSession, "host_interrupted", boom)
    with pytest.raises(DeviceMemoryError, match="the GPU ran out of memory: turn on train.gradient_checkpointing"):
        Trainer(config(tmp_path), host=host()).run()
    assert calls["n"] >= 1
    assert (live_model.state_hash(sd), flags(sd), modes(sd)) == before
    assert not env.call_queue.queue_lock.locked()
    assert not any(type(m).__module__.startswith("peft") for m in sd.modules())


def test_a_run_stopped_by_webui_interrupt_restores_everything(env, tmp_path: Path) -> None:
    from lora_trainer.train.trainer import Trainer

    sd = env.model
    before = (live_model.state_hash(sd), flags(sd), modes(sd))
    h = host()

    def interrupt_at_step_2(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            env.shared.state.interrupt()  # the WebUI's Interrupt button

    result = Trainer(config(tmp_path, **{"train.max_train_steps": 50}), host=h, callbacks=[interrupt_at_step_2]).run()
    assert result.stopped and result.steps < 50
    assert (live_model.state_hash(sd), flags(sd), modes(sd)) == before


def test_leftover_lora_layers_and_moved_parts_are_put_back(env, tmp_path: Path) -> None:
    """A run that died before its own cleanup: release_bundle still restores the model exactly."""
    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.inject import inject_lora

    sd = env.model
    before = (live_model.state_hash(sd), flags(sd), modes(sd))
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    inject_lora(bundle, NetworkConfig(rank=4, alpha=2.0, train_text_encoder=True))
    bundle.vae.to(torch.float64)
    bundle.unet.train()
    h.release_bundle(bundle)  # no network.remove(), no .to() back
    assert (live_model.state_hash(sd), flags(sd), modes(sd)) == before
    assert not any(type(m).__module__.startswith("peft") for m in sd.modules())


def test_changed_weights_trigger_a_checkpoint_reload(env, tmp_path: Path) -> None:
    sd = env.model
    checkpoint = live_model.state_hash(sd)
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    with torch.no_grad():
        next(bundle.unet.parameters()).add_(1.0)  # a bug that touched a base weight
    h.release_bundle(bundle)
    assert env.sd_models.reloads and live_model.state_hash(sd) == checkpoint


def test_lowvram_is_refused_and_medvram_placement_restored(env, tmp_path: Path) -> None:
    env.shared.cmd_opts.lowvram = True
    with pytest.raises(HostError, match="--lowvram"):
        host().acquire_bundle(config(tmp_path))
    env.shared.cmd_opts.lowvram = False
    env.shared.cmd_opts.medvram = True
    env.model.lowvram = True
    env.lowvram.module_in_gpu = env.model.first_stage_model
    h = host()
    bundle = h.acquire_bundle(config(tmp_path))
    assert env.lowvram.module_in_gpu is None  # everything sent to the CPU, UNet placed for training
    h.release_bundle(bundle)
    assert env.lowvram.module_in_gpu is env.model.first_stage_model


def test_queue_lock_progress_and_interrupt(env) -> None:
    h = host()
    with h.lock():
        assert env.call_queue.queue_lock.locked()
        assert env.call_queue.queue_lock.acquired_by[-1] == threading.get_ident()
        h.on_event(TrainEvent("step", step=5, total_steps=20, loss=0.25))
        assert (env.shared.state.sampling_step, env.shared.state.sampling_steps) == (5, 20)
        assert "0.2500" in env.shared.state.textinfo
        from PIL import Image
        h.on_event(TrainEvent("sample", image=Image.new("RGB", (8, 8))))
        assert env.shared.state.current_image is not None
        assert not h.interrupted()
        env.shared.state.interrupt()
        assert h.interrupted()
    assert not env.call_queue.queue_lock.locked()


def test_a_run_behind_a_generation_waits_and_stop_ends_the_wait(env, tmp_path: Path) -> None:
    """Start pressed while a generation holds the WebUI's queue: the run says it waits, touches
    neither the model nor the progress bar, and Stop ends it without taking the queue."""
    from lora_trainer.train.trainer import WAITING, Trainer

    queue = env.call_queue.queue_lock
    waiting = threading.Event()
    before = live_model.state_hash(env.model)
    assert queue.acquire(False)  # the generation
    trainer = Trainer(config(tmp_path), host=host(),
                      callbacks=[lambda ev: ev.kind == "status" and ev.message == WAITING and waiting.set()])
    try:
        thread = trainer.start()
        assert waiting.wait(timeout=300), trainer.state.snapshot()["log"]
        assert env.shared.state.job == ""  # the WebUI's progress is the generation's, not ours
        trainer.stop()
        thread.join(timeout=300)
        assert not thread.is_alive() and trainer.error is None
        assert trainer.result.stopped and trainer.result.steps == 0 and trainer.result.lora_path is None
        assert live_model.state_hash(env.model) == before and queue.locked()
    finally:
        trainer.stop()
        queue.release()  # the generation ends (also when a check failed: later tests need the queue)
    assert queue.acquire(True)  # the abandoned wait let go of the queue when it came
    queue.release()


def test_the_live_model_is_handed_back_exact_after_its_parts_were_parked(env, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The WebUI's own modules leave the card while captions and latents are encoded (a stand-in
    # card: tests/train_helpers.FakeCard) and come back as they were: the same Parameter objects
    # (the WebUI's LoRA backups refer to them), the same bits, flags and modes.
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import FakeCard

    sd = env.model
    parts = {"unet": sd.model.diffusion_model, "vae": sd.first_stage_model, "te": sd.cond_stage_model.wrapped.transformer}
    card = FakeCard(monkeypatch, **parts)
    seen: list[tuple[str, ...]] = []
    hook = parts["te"].register_forward_pre_hook(
        lambda *_: seen.append(tuple(card.device_of(m).type for m in parts.values())))
    before, params = (live_model.state_hash(sd), flags(sd), modes(sd)), list(sd.parameters())
    reloads = len(env.sd_models.reloads)
    try:
        cfg = config(tmp_path, **{"network.train_text_encoder": False, "data.cache_latents": "memory"})
        Trainer(cfg, host=host()).run()
    finally:
        hook.remove()
    assert seen and set(seen) == {("cpu", "cpu", "cuda")}  # the encoder alone on the card
    assert (live_model.state_hash(sd), flags(sd), modes(sd)) == before
    assert all(p is q for p, q in zip(sd.parameters(), params, strict=True))
    assert {k: card.device_of(m).type for k, m in parts.items()} == dict.fromkeys(parts, "cuda")
    assert len(env.sd_models.reloads) == reloads  # nothing changed, so the WebUI reloaded nothing
