"""End-to-end training runs on tiny models (resolution 64, CPU, a few steps each)."""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer.config import build_config
from lora_trainer.errors import HostError
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from lora_trainer.ui import handlers
from tests.train_helpers import TinyHost, lora_tensors, make_data, make_transparent_data, tiny_config


def _state_fingerprint(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: (v.dtype, tuple(v.shape), float(v.double().sum())) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def host() -> TinyHost:
    return TinyHost("sd1")


def test_run_writes_lora_and_outputs_and_restores_model(tmp_path: Path, data: Path, host: TinyHost) -> None:
    before = _state_fingerprint(host.bundle.unet)
    names_before = sorted(n for n, _ in host.bundle.unet.named_modules())
    seen: list[TrainEvent] = []
    cfg = tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 3, "output.tensorboard": True})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.yaml").write_text("# the user's own notes\n")
    result = Trainer(cfg, host=host, callbacks=[seen.append]).run()
    backups = list((tmp_path / "out" / ".backup").glob("config.yaml.*.bak"))
    assert len(backups) == 1 and backups[0].read_text() == "# the user's own notes\n"
    assert result.steps == 3 and not result.stopped
    assert result.lora_path == tmp_path / "out" / "tiny.safetensors" and result.lora_path.is_file()
    keys = list(lora_tensors(result.lora_path))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["status"] == "done"
    assert summary["final_loss"] == pytest.approx(result.final_loss)
    assert (tmp_path / "out" / "config.yaml").read_text().count("max_train_steps: 3") == 1
    logs = tmp_path / "out" / "logs" / "tiny"
    if importlib.util.find_spec("tensorboard") is not None:
        assert any(p.name.startswith("events.out.tfevents") for p in logs.iterdir())
    else:  # as in the A1111 WebUI's venv
        rows = (logs / "metrics.csv").read_text().splitlines()
        assert rows[0] == "step,name,value" and [r.split(",")[0] for r in rows if ",train/loss," in r] == ["1", "2", "3"]
    steps = [e for e in seen if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3]
    assert all(e.loss is not None and e.lr == pytest.approx(1e-3) and e.total_steps == 3 for e in steps)
    assert steps[-1].eta_s == pytest.approx(0.0)
    assert seen[-1].kind == "done" and host.events[-1].kind == "done"
    assert host.refreshed == 1 and host.released == 1
    # the LoRA layers are gone and the base weights are exactly as before
    assert sorted(n for n, _ in host.bundle.unet.named_modules()) == names_before
    assert _state_fingerprint(host.bundle.unet) == before
    # a second run with the same name gets a new version instead of overwriting
    again = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 1}), host=host).run()
    assert again.lora_path.name == "tiny_v2.safetensors"
    # output_dir's config.yaml and summary.json are the latest run's; each run keeps its own beside its logs
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["lora_path"] == str(again.lora_path)
    for stem, steps in (("tiny", 3), ("tiny_v2", 1)):
        own = json.loads((tmp_path / "out" / "logs" / stem / "summary.json").read_text())
        assert (own["steps"], own["lora_path"]) == (steps, str(tmp_path / "out" / f"{stem}.safetensors"))
        used = (tmp_path / "out" / "logs" / stem / "config.yaml").read_text()
        assert own["config"] == str(tmp_path / "out" / "logs" / stem / "config.yaml")
        assert f"max_train_steps: {steps}" in used and "tiny" in used
    # the first run's config.yaml, replaced by the second's, is kept in logs/tiny: no backup of it
    assert [p.read_text() for p in (tmp_path / "out" / ".backup").iterdir()] == ["# the user's own notes\n"]


def _eval_loss(bundle, latents: torch.Tensor, cond: dict) -> float:
    from lora_trainer.train.losses import q_sample

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([50, 250, 450, 650, 850])
    lat = latents.expand(len(t), -1, -1, -1)
    noise = torch.randn(lat.shape, generator=g)
    c = {k: v.expand(len(t), *v.shape[1:]) for k, v in cond.items()}
    with torch.no_grad():
        pred = bundle.predict(q_sample(lat, noise, t, bundle.alphas_cumprod), t, c, None)
    return float((pred - noise).pow(2).mean())


def test_high_learning_rate_lowers_the_loss_on_a_fixed_image(tmp_path: Path, host: TinyHost) -> None:
    from lora_trainer.data.captions import read_metadata_csv
    from lora_trainer.data.dataset import pil_to_tensor
    from lora_trainer.data.images import open_image_rgb
    from lora_trainer.lora.inject import inject_lora

    one = make_data(tmp_path / "one", n=1)
    cfg = tiny_config(one, tmp_path / "out", **{"train.max_train_steps": 16, "optim.learning_rate": 3e-2,
                                                 "output.save_precision": "fp32"})
    b = host.bundle
    img = pil_to_tensor(open_image_rgb(one / "demo_000.png").resize((64, 64)))[None]
    caption = read_metadata_csv(one / "metadata.csv")["demo_000.png"]
    with torch.no_grad():
        latents, cond = b.encode_images(img), b.encode_text([caption])
    before = _eval_loss(b, latents, cond)
    result = Trainer(cfg, host=host).run()
    net = inject_lora(b, cfg.network)
    try:
        net.load_kohya(lora_tensors(result.lora_path))
        after = _eval_loss(b, latents, cond)
    finally:
        net.remove()
    print(f"eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)


def test_stop_command_saves_checkpoint_and_lora(tmp_path: Path, data: Path, host: TinyHost) -> None:
    trainer: Trainer

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            trainer.stop()

    trainer = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 50}), host=host,
                      callbacks=[stop_at_two])
    result = trainer.run()
    assert result.stopped and result.steps == 2
    assert result.lora_path.is_file()
    assert (tmp_path / "out" / "checkpoints" / "tiny" / "step-000002" / "lora.safetensors").is_file()
    assert trainer.state.snapshot()["status"] == "stopped"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "stopped"


def test_host_interrupt_stops_like_the_stop_command(tmp_path: Path, data: Path) -> None:
    host = TinyHost("sd1")
    host.stop_at_step = 1
    result = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 50}), host=host).run()
    assert result.stopped and result.steps == 1
    assert (tmp_path / "out" / "checkpoints" / "tiny" / "step-000001").is_dir()


def _run_behind_a_busy_model(tmp_path: Path, data: Path, host: TinyHost) -> tuple[Trainer, Any]:
    """A run started while another job (a WebUI generation, a render) holds the host's lock:
    the trainer and its thread once the run says it is waiting."""
    from lora_trainer.train.trainer import WAITING

    waiting = threading.Event()

    def on_event(ev: TrainEvent) -> None:
        if ev.kind == "status" and ev.message == WAITING:
            waiting.set()

    assert host._lock.acquire(blocking=False)  # the other job
    trainer = Trainer(tiny_config(data, tmp_path / "out"), host=host, callbacks=[on_event])
    thread = trainer.start()
    assert waiting.wait(timeout=300), trainer.state.snapshot()["log"]
    assert "waiting for the model" in handlers.progress_html(trainer.state.snapshot())
    return trainer, thread


def test_stop_while_the_model_is_busy_ends_the_wait(tmp_path: Path, data: Path, host: TinyHost) -> None:
    """Stop while a generation holds the WebUI's queue: the run ends at once, nothing loaded or
    written, and the queue is not taken from the job that holds it, nor left taken afterwards."""
    host = TinyHost(bundle=host.bundle)  # its own lock: a failure here leaves no other test waiting
    trainer, thread = _run_behind_a_busy_model(tmp_path, data, host)
    trainer.stop()
    thread.join(timeout=300)
    assert not thread.is_alive() and trainer.error is None
    r = trainer.result
    assert r.stopped and r.steps == 0 and r.lora_path is None
    assert host.released == 0 and not list(tmp_path.rglob("*.safetensors"))
    snap = trainer.state.snapshot()
    assert handlers.outcome_text(snap) == "stopped before the first step; nothing was written"
    assert host._lock.locked()  # still the other job's
    host._lock.release()
    assert host._lock.acquire(timeout=300)  # the abandoned wait let go of it when it came
    host._lock.release()


def test_a_run_waiting_for_the_model_trains_when_it_is_free(tmp_path: Path, data: Path, host: TinyHost) -> None:
    host = TinyHost(bundle=host.bundle)
    trainer, thread = _run_behind_a_busy_model(tmp_path, data, host)
    assert trainer.state.snapshot()["step"] == 0 and host.released == 0
    host._lock.release()
    thread.join(timeout=300)
    assert trainer.error is None and trainer.result.steps == 2 and trainer.result.lora_path.is_file()
    assert not host._lock.locked()


def test_a_raising_callback_does_not_break_the_run(tmp_path: Path, data: Path, host: TinyHost) -> None:
    calls = []

    def broken(ev: TrainEvent) -> None:
        calls.append(ev.kind)
        raise RuntimeError("UI bug")

    result = Trainer(tiny_config(data, tmp_path / "out"), host=host, callbacks=[broken]).run()
    assert result.steps == 2 and result.lora_path.is_file()
    assert "step" in calls and calls[-1] == "done"


def test_worker_thread_with_save_and_sample_commands(tmp_path: Path, data: Path, host: TinyHost) -> None:
    trainer: Trainer
    requested = []

    def on_event(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 1 and not requested:
            requested.append(1)
            trainer.save_now()
            trainer.sample_now()

    cfg = tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 3, "sample.prompt": "a red circle",
                                                 "sample.steps": 2})
    trainer = Trainer(cfg, host=host, callbacks=[on_event])
    trainer.start().join(timeout=120)
    assert trainer.error is None and trainer.result is not None
    snap = trainer.state.snapshot()
    assert snap["status"] == "done" and snap["step"] == 3
    kinds = [e.kind for e in host.events]
    assert "checkpoint" in kinds and "sample" in kinds
    assert (tmp_path / "out" / "checkpoints" / "tiny" / "step-000001").is_dir()  # taken at the same step's check
    samples = sorted((tmp_path / "out" / "samples" / "tiny").glob("*.png"))
    assert [p.name for p in samples] == ["step-000001.png", "step-000003.png"]  # asked + final preview
    assert snap["samples"] and snap["samples"][-1][0] == 3


def test_nothing_is_written_outside_output_dir(tmp_path: Path, host: TinyHost) -> None:
    data = make_data(tmp_path / "data", n=2)

    def listing() -> dict[str, float]:
        return {str(p.relative_to(tmp_path)): p.stat().st_mtime for p in tmp_path.rglob("*")
                if "out" not in p.relative_to(tmp_path).parts}

    before = listing()
    cfg = tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 2, "train.save_steps": 1,
                                                 "data.cache_latents": "disk", "output.tensorboard": True,
                                                 "sample.prompt": "x", "sample.steps": 1})
    Trainer(cfg, host=host).run()
    assert listing() == before
    assert list((tmp_path / "out" / ".cache" / "latents").glob("*.safetensors"))


def test_each_checkpoint_writes_a_step_lora_beside_the_final_one(tmp_path: Path, data: Path, host: TinyHost) -> None:
    from lora_trainer.lora.files import read_lora_file

    out = tmp_path / "out"
    cfg = tiny_config(data, out, **{"train.max_train_steps": 4, "train.save_steps": 2})
    seen: list[TrainEvent] = []
    result = Trainer(cfg, host=host, callbacks=[seen.append]).run()
    steps = sorted(p.name for p in out.glob("tiny-step*.safetensors"))
    assert steps == ["tiny-step000002.safetensors", "tiny-step000004.safetensors"]
    final, final_meta = read_lora_file(result.lora_path)
    step4, meta4 = read_lora_file(out / steps[1])
    step2, meta2 = read_lora_file(out / steps[0])
    assert set(step2) == set(final) and all(k.startswith("lora_unet_") or k.startswith("lora_te") for k in step2)
    assert all(torch.equal(step4[k], final[k]) for k in final)  # the last step is the final LoRA
    assert any(not torch.equal(step2[k], final[k]) for k in final if k.endswith("lora_up.weight"))
    assert (meta2["ss_steps"], meta4["ss_steps"], final_meta["ss_steps"]) == ("2", "4", "4")
    assert meta2["ss_output_name"] == "tiny-step000002"  # the WebUI's alias, unique per file
    checkpoint_msgs = [e.message for e in seen if e.kind == "checkpoint"]
    assert [m.rsplit(": ", 1)[-1] for m in checkpoint_msgs] == ["tiny-step000002", "tiny-step000004"]

    # A second run into the same folder never replaces the first run's files: both get _v2 names.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    again = Trainer(cfg, host=host).run()
    assert again.lora_path.name == "tiny_v2.safetensors"
    assert {p.name for p in out.glob("tiny_v2-step*.safetensors")} == {"tiny_v2-step000002.safetensors",
                                                                       "tiny_v2-step000004.safetensors"}
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())


def test_step_loras_can_be_switched_off_and_a_stop_writes_only_the_final_lora(tmp_path: Path, data: Path,
                                                                              host: TinyHost) -> None:
    off = tiny_config(data, tmp_path / "a", **{"train.max_train_steps": 2, "train.save_steps": 1,
                                               "output.save_step_loras": False})
    Trainer(off, host=host).run()
    assert [p.name for p in (tmp_path / "a").glob("*.safetensors")] == ["tiny.safetensors"]

    trainer: Trainer

    def stop_at_three(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 3:
            trainer.stop()

    on = tiny_config(data, tmp_path / "b", **{"train.max_train_steps": 50, "train.save_steps": 2})
    trainer = Trainer(on, host=host, callbacks=[stop_at_three])
    assert trainer.run().steps == 3
    assert sorted(p.name for p in (tmp_path / "b").glob("*.safetensors")) == ["tiny-step000002.safetensors",
                                                                              "tiny.safetensors"]


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access\nwas encountered"),
                                   HostError("no checkpoint is loaded in the WebUI; pick one first")])
def test_a_failed_worker_run_says_it_in_one_line_and_logs_where_the_host_shows_logs(
        tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    class FailingHost(TinyHost):
        def acquire_bundle(self, config):
            raise error

    trainer = Trainer(tiny_config(data, tmp_path / "out"), host=FailingHost("sd1"))
    with caplog.at_level(logging.ERROR):
        trainer.start().join()
    snap = trainer.state.snapshot()
    assert trainer.error is error and snap["status"] == "error"
    assert "\n" not in snap["error"] and snap["error"].endswith(str(error).split("\n")[-1])
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "LoRA training failed" in record.getMessage()
    # a bug or the environment: the traceback goes to the console; a user mistake: one line
    assert (record.exc_info is not None) == (not isinstance(error, HostError))


def test_without_tensorboard_the_scalars_go_to_a_csv(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The A1111 WebUI's venv has no tensorboard: every run there logs to a CSV, said once as
    information, not as a warning in the WebUI's console."""
    import sys

    from lora_trainer.train.outputs import Logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as where it is missing
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        logger = Logger(tmp_path, enabled=True)
    assert [r.levelno for r in caplog.records if "metrics.csv" in r.getMessage()] == [logging.INFO]
    logger.scalars(1, loss=0.5, lr=1e-4)
    logger.scalars(2, loss=0.25, lr=None)
    logger.scalar("eval/loss", 0.75, 2)
    logger.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "step,name,value", "1,train/loss,0.5", "1,train/lr,0.0001", "2,train/loss,0.25", "2,eval/loss,0.75"]
    Logger(tmp_path / "off", enabled=False).scalars(1, loss=1.0)
    assert not (tmp_path / "off").exists()


def test_epochs_are_counted_from_one_like_kohya(tmp_path: Path, host: TinyHost) -> None:
    """Two epochs of two images: summary.json and ss_epoch say 2 (kohya writes the number of
    epochs trained), not the 0-based index 1."""
    from lora_trainer.lora.files import read_lora_file

    two = make_data(tmp_path / "two", n=2)
    result = Trainer(tiny_config(two, tmp_path / "out", **{"train.max_train_steps": None, "train.epochs": 2}),
                     host=host).run()
    assert result.steps == 4
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["epoch"] == 2
    assert read_lora_file(result.lora_path)[1]["ss_epoch"] == "2"


OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 11.76 GiB of which "
       "1.03 GiB is free. Including non-PyTorch memory, this process has 10.71 GiB memory in use. Of the "
       "allocated memory 9.80 GiB is allocated by PyTorch, and 0.62 GiB is reserved by PyTorch but unallocated.")


@pytest.mark.parametrize("values,says,not_says", [
    ({"train.batch_size": 2}, ["turn on train.gradient_checkpointing", "lower train.batch_size (now 2)"],
     "checkpointing_share"),
    ({"train.gradient_checkpointing": True, "train.checkpointing_share": 0.5},
     ["raise train.checkpointing_share (now 0.5) towards 1"], "batch_size"),
    ({"train.fp32_norms": True, "train.mixed_precision": "bf16"},
     ["turn off train.fp32_norms, or turn on train.gradient_checkpointing"], "batch_size"),
])
def test_running_out_of_gpu_memory_is_one_line_naming_the_settings_to_change(
        data: Path, tmp_path: Path, values: dict, says: list[str], not_says: str) -> None:
    from lora_trainer.errors import DeviceMemoryError
    from tests.lora_fixtures import same_snapshot, snapshot

    host = TinyHost("sd1")
    before = snapshot(host.bundle.unet)

    def out_of_memory(module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():  # the first training step
            raise torch.cuda.OutOfMemoryError(OOM)

    hook = host.bundle.unet.register_forward_pre_hook(out_of_memory)
    events: list[TrainEvent] = []
    try:
        with pytest.raises(DeviceMemoryError) as caught:
            Trainer(tiny_config(data, tmp_path / "out", **values), host=host, callbacks=[events.append]).run()
    finally:
        hook.remove()
    text = str(caught.value)
    assert text.startswith("the GPU ran out of memory (2.00 GiB more asked, 11.76 GiB in all): ")
    assert all(s in text for s in says) and not_says not in text and "'auto' preset" in text
    assert "\n" not in text and events[-1].kind == "error" and events[-1].message == text
    assert same_snapshot(snapshot(host.bundle.unet), before)  # the LoRA layers came out again


def test_other_runtime_errors_are_not_called_out_of_memory(data: Path, tmp_path: Path) -> None:
    host = TinyHost("sd1")

    def broken(module: torch.nn.Module, args: tuple) -> None:
        if torch.is_grad_enabled():
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    hook = host.bundle.unet.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
            Trainer(tiny_config(data, tmp_path / "out"), host=host).run()
    finally:
        hook.remove()
    assert type(caught.value) is RuntimeError


def test_saves_and_samples_at_the_end_of_every_n_epochs(tmp_path: Path, host: TinyHost) -> None:
    """kohya's save_every_n_epochs and sample_every_n_epochs: 3 epochs of 2 steps, every 2nd and
    every epoch; the last epoch's sample is the run's end sample, not a second one."""
    two = make_data(tmp_path / "two", n=2)
    out = tmp_path / "out"
    cfg = tiny_config(two, out, **{"train.max_train_steps": None, "train.epochs": 3, "train.save_every_n_epochs": 2,
                                   "sample.prompt": "a cat", "sample.every_n_epochs": 1, "sample.steps": 2})
    seen: list[TrainEvent] = []
    result = Trainer(cfg, host=host, callbacks=[seen.append]).run()
    assert result.steps == 6
    assert [e.step for e in seen if e.kind == "checkpoint"] == [4]
    assert sorted(p.name for p in out.glob("tiny-step*.safetensors")) == ["tiny-step000004.safetensors"]
    assert [e.step for e in seen if e.kind == "sample"] == [2, 4, 6]
    assert sorted(p.name for p in (out / "samples" / "tiny").iterdir()) == [
        "step-000002.png", "step-000004.png", "step-000006.png"]


def test_sample_at_first_renders_the_model_before_training(tmp_path: Path, host: TinyHost) -> None:
    """kohya's sample_at_first: a sample before the first step, then the run's own; not again on a resume."""
    two = make_data(tmp_path / "two", n=2)
    out = tmp_path / "out"
    values = {"train.max_train_steps": 2, "sample.prompt": "a cat", "sample.steps": 2, "sample.at_first": True,
              "train.save_steps": 1}
    seen: list[TrainEvent] = []
    Trainer(tiny_config(two, out, **values), host=host, callbacks=[seen.append]).run()
    assert [e.step for e in seen if e.kind == "sample"] == [0, 2]
    assert sorted(p.name for p in (out / "samples" / "tiny").iterdir()) == ["step-000000.png", "step-000002.png"]
    seen.clear()
    Trainer(tiny_config(two, out, **{**values, "train.max_train_steps": 3, "train.resume": "latest"}), host=host,
            callbacks=[seen.append]).run()
    assert [e.step for e in seen if e.kind == "sample"] == [3]


def test_each_line_of_the_sample_prompt_is_sampled_with_its_own_options(tmp_path: Path, host: TinyHost) -> None:
    """Several sample prompts, a line each as in a kohya prompts file: every sample step renders
    each with the section's settings and its line's --w/--h/--d/--n; the first prompt's image is
    also the LoRA's preview card, and the gallery tells the prompts apart."""
    from PIL import Image

    two = make_data(tmp_path / "two", n=2)
    out = tmp_path / "out"
    cfg = tiny_config(two, out, **{"train.max_train_steps": 2, "sample.every_n_steps": 1, "sample.steps": 2,
                                   "sample.prompt": "a cat\n# not a prompt\n\na dog --w 96 --h 64 --d 7 --n blurry"})
    seen: list[TrainEvent] = []
    result = Trainer(cfg, host=host, callbacks=[seen.append]).run()
    samples = [e for e in seen if e.kind == "sample"]
    assert [(e.step, Path(e.path).name, e.image.size) for e in samples] == [
        (1, "step-000001.png", (64, 64)), (1, "step-000001-2.png", (96, 64)),
        (2, "step-000002.png", (64, 64)), (2, "step-000002-2.png", (96, 64))]
    assert sorted(p.name for p in (out / "samples" / "tiny").iterdir()) == sorted(Path(e.path).name for e in samples)
    preview = Image.open(result.lora_path.with_suffix(".png"))
    assert preview.size == (64, 64) and preview.tobytes() == samples[2].image.convert(preview.mode).tobytes()
    assert [c for _, c in handlers.sample_gallery([(e.step, e.image) for e in samples])] == [
        "step 1, prompt 1", "step 1, prompt 2", "step 2, prompt 1", "step 2, prompt 2"]
    assert [c for _, c in handlers.sample_gallery([(5, None), (6, None)])] == ["step 5", "step 6"]


def test_a_sample_every_few_minutes_of_training(tmp_path: Path, host: TinyHost,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """sample.every_n_minutes (10 by default): a run that sets no step or epoch cadence still
    shows how it goes; each step takes a minute of a turned-forward clock here, and any sample
    (Sample now included) starts the minutes again."""
    from lora_trainer.train import session

    assert tiny_config(tmp_path, tmp_path).sample.every_n_minutes == 10.0
    now = [0.0]
    monkeypatch.setattr(session, "clock", lambda: now[0])
    trainer: Trainer

    def a_minute_per_step(ev: TrainEvent) -> None:
        if ev.kind == "step":
            now[0] += 60.0
            if ev.step == 4:
                trainer.commands.request_sample()

    two = make_data(tmp_path / "two", n=2)
    cfg = tiny_config(two, tmp_path / "out", **{"train.max_train_steps": 9, "sample.prompt": "a cat", "sample.steps": 2,
                                               "sample.every_n_minutes": 2.5})
    seen: list[TrainEvent] = []
    trainer = Trainer(cfg, host=host, callbacks=[seen.append, a_minute_per_step])
    trainer.run()
    assert [e.step for e in seen if e.kind == "sample"] == [3, 4, 7, 9]  # 3 min, asked, 3 min after, the end
    seen.clear()

    def a_minute(ev: TrainEvent) -> None:
        now[0] += 60.0 if ev.kind == "step" else 0.0

    Trainer(build_config({"sample.every_n_minutes": 0}, base=cfg), host=host, callbacks=[seen.append, a_minute]).run()
    assert [e.step for e in seen if e.kind == "sample"] == [9]  # off: the end's alone


def test_a_zero_terminal_snr_run_trains_and_samples_finite_values(tmp_path: Path, data: Path, host: TinyHost) -> None:
    """kohya's zero_terminal_snr on a v-prediction model with Min-SNR and the debiased loss: the
    losses and the sample stay finite, the LoRA differs from the same run on the plain schedule,
    and the file says so (ss_zero_terminal_snr)."""
    from PIL import Image

    from lora_trainer.lora.files import read_lora_file

    values = {"model.prediction_type": "v_prediction", "train.zero_terminal_snr": True, "train.min_snr_gamma": 5.0,
              "train.debiased_estimation_loss": True, "train.max_train_steps": 4, "train.max_timestep": 1000,
              "train.min_timestep": 900, "sample.prompt": "a red circle", "sample.steps": 3}
    on = Trainer(tiny_config(data, tmp_path / "on", **values), host=host).run()
    off = Trainer(tiny_config(data, tmp_path / "off", **{**values, "train.zero_terminal_snr": False}), host=host).run()
    assert on.final_loss is not None and torch.isfinite(torch.tensor(on.final_loss))
    a, b = lora_tensors(on.lora_path), lora_tensors(off.lora_path)
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(v, b[k]) for k, v in a.items())
    sample = next((tmp_path / "on" / "samples" / "tiny").glob("*.png"))
    pixels = torch.tensor(list(Image.open(sample).convert("L").getdata()), dtype=torch.float32)
    assert float(pixels.std()) > 0  # an image, not a NaN-black square
    assert read_lora_file(on.lora_path)[1]["ss_zero_terminal_snr"] == "True"


def test_alpha_mask_trains_on_transparent_pngs_and_changes_the_lora(tmp_path: Path, host: TinyHost) -> None:
    """Transparent PNGs whose transparent region differs wildly between images train with
    alpha_mask (kohya's masked_loss in the file's metadata), to a LoRA other than the same run's
    without it; the loss the step sees is masked (every batch carries its masks)."""
    from lora_trainer.lora.files import read_lora_file
    from lora_trainer.train import session as session_mod

    data = make_transparent_data(tmp_path / "data", n=4)
    values = {"train.max_train_steps": 3, "train.batch_size": 2, "output.save_precision": "fp32"}
    seen: list[tuple[int, ...] | None] = []
    original = session_mod.RunSession.loss_mask

    def spy(self, batch, latents):
        mask = original(self, batch, latents)
        seen.append(None if mask is None else tuple(mask.shape))
        return mask

    session_mod.RunSession.loss_mask = spy
    try:
        masked = Trainer(tiny_config(data, tmp_path / "a", **values, **{"data.alpha_mask": True}), host=host).run()
        plain = Trainer(tiny_config(data, tmp_path / "b", **values), host=host).run()
    finally:
        session_mod.RunSession.loss_mask = original
    assert masked.steps == plain.steps == 3 and masked.final_loss is not None
    assert seen[:3] == [(2, 1, 8, 8)] * 3 and seen[3:] == [None] * 3
    a, b = lora_tensors(masked.lora_path), lora_tensors(plain.lora_path)
    assert a.keys() == b.keys() and all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert read_lora_file(masked.lora_path)[1]["ss_masked_loss"] == "True"
    assert read_lora_file(plain.lora_path)[1]["ss_masked_loss"] == "False"
