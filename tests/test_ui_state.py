"""The tab keeps its place (issue 17, item 6), without a browser: what the poll sends as a run
starts, ends or fails, the preset shown, number inputs, messages that say what to do in the UI,
a port in use."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lora_trainer import jobs
from lora_trainer.config import TrainConfig, build_config
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.train.events import TrainEvent, WorkerRun
from lora_trainer.ui import handlers, presets

gr = pytest.importorskip("gradio")
from lora_trainer.ui import app as appmod  # noqa: E402
from lora_trainer.ui import compat  # noqa: E402


class StepTrainer(WorkerRun):
    """A trainer double with the Trainer surface; subclasses say what its run emits."""

    def __init__(self, config: TrainConfig, host: Any, callbacks: list[Any]) -> None:
        super().__init__(callbacks)
        self.config = config


def test_progress_says_starting_then_drops_a_stale_eta_and_knows_max_steps():
    # right after Start: the worker is alive but has sent nothing yet
    assert "starting…" in handlers.progress_html({"status": "idle", "alive": True, "step": 0, "total_steps": 0,
                                                  "max_train_steps": 30})
    stopped = handlers.progress_html({"status": "stopped", "step": 12, "total_steps": 30, "it_per_s": 2.0,
                                      "eta_s": 9.0, "error": None})
    assert "stopped · step 12/30" in stopped and "ETA" not in stopped  # nothing left to wait for
    failed = handlers.progress_html({"status": "error", "step": 0, "total_steps": 0, "max_train_steps": 30,
                                     "error": "bad folder"})
    assert "step 0/30" in failed and "0/?" not in failed and "ETA" not in failed


def test_job_snapshot_carries_the_configured_max_steps():
    class Silent(StepTrainer):
        def run(self) -> None:
            self.state.update(TrainEvent("error", message="no images"))

    jobs.clear_finished()
    job = jobs.start(build_config({"train.max_train_steps": 30}), host=None, factory=Silent)
    job.join()
    assert "step 0/30" in handlers.progress_html(job.snapshot())
    jobs.clear_finished()


def test_the_run_end_replaces_the_start_message_and_stop_is_red_only_while_running(tmp_path: Path):
    from types import SimpleNamespace

    from lora_trainer.ui.train_section import _poll

    release = threading.Event()

    class Failing(StepTrainer):
        def run(self) -> None:
            release.wait()
            self.state.update(TrainEvent("error", message="data.train_data_dir: no images"))

    ctx = SimpleNamespace(host=SimpleNamespace(lora_dir=lambda cfg: tmp_path), prefix="lt-", remember_last_run=False,
                          defaults=build_config({"output.output_dir": str(tmp_path)}))
    jobs.clear_finished()
    job = jobs.start(build_config({}), host=None, factory=Failing)
    try:
        out = _poll(ctx, None)
        msg, stop, seen = out[6], out[7], out[-1]
        assert "starting…" in out[0] and msg == compat.update() and stop["variant"] == "stop"
        out = _poll(ctx, seen)
        assert "variant" not in out[7]  # sent when it changes, not every second
        release.set()
        job.join()
        out = _poll(ctx, out[-1])
        assert out[6].startswith("⚠") and "no images" in out[6]  # "started…" is replaced
        assert out[7]["variant"] == "secondary"
        out = _poll(ctx, out[-1])
        assert out[6] == compat.update()  # said once: a later message is not overwritten
    finally:
        release.set()
        job.join()
        jobs.clear_finished()


def test_a_page_loaded_after_the_run_ended_keeps_its_own_message(tmp_path: Path):
    """A page's first poll shows an ended run in the progress line, not over the message under
    Start (the user's first action may already have written there); a page that was open when
    the run ended gets the outcome."""
    from types import SimpleNamespace

    from lora_trainer.ui.train_section import _poll

    release = threading.Event()

    class Done(StepTrainer):
        def run(self) -> None:
            release.wait()
            self.state.update(TrainEvent("step", step=3, total_steps=3, loss=0.5))
            self.state.update(TrainEvent("done", step=3, total_steps=3, path=str(tmp_path / "x.safetensors")))

    ctx = SimpleNamespace(host=SimpleNamespace(lora_dir=lambda cfg: tmp_path), prefix="lt-", remember_last_run=False,
                          defaults=build_config({"output.output_dir": str(tmp_path)}))
    jobs.clear_finished()
    idle = _poll(ctx, None)
    assert idle[6] == compat.update() and idle[-1] is not None  # the page has polled once
    assert "idle" in idle[0]
    # "idle" is not sent again: a poll that saw no job yet but is answered after Start's
    # "starting…" must not write "idle" over it
    assert _poll(ctx, idle[-1])[0] == compat.update()
    job = jobs.start(build_config({"train.max_train_steps": 3}), host=None, factory=Done)
    try:
        release.set()
        job.join()
        open_page = _poll(ctx, idle[-1])
        assert open_page[6] == "done at step 3; LoRA written to " + str(tmp_path / "x.safetensors")
        new_page = _poll(ctx, None)
        assert new_page[6] == compat.update() and "done · step 3/3" in new_page[0]
    finally:
        release.set()
        job.join()
        jobs.clear_finished()


def test_outcome_text_of_each_end():
    assert handlers.outcome_text({"status": "stopped", "step": 7, "output_path": "/o/x.safetensors"}) == \
        "stopped at step 7; LoRA written to /o/x.safetensors"
    part_way = {"status": "stopped", "step": 7, "total_steps": 30, "checkpoints": 1, "output_path": "/o/x.safetensors"}
    assert handlers.outcome_text(part_way) == \
        "stopped at step 7; LoRA written to /o/x.safetensors; Continue trains on from step 7"
    assert not handlers.continuable({**part_way, "checkpoints": 0})  # nothing to go on from
    assert not handlers.continuable({**part_way, "step": 30})  # nothing left to do
    assert not handlers.continuable({**part_way, "status": "done"})
    assert handlers.outcome_text({"status": "done", "step": 30, "output_path": None}) == "done at step 30"
    assert "see the log" in handlers.outcome_text({"status": "finished", "step": 3})


def test_caption_error_in_the_ui_says_what_to_do_there():
    from lora_trainer.errors import ModelMissingError

    e = ModelMissingError("BLIP weights 'x/blip' are not on this machine: put the model folder in /c/blip",
                          "--blip-model PATH")
    assert str(e).endswith("or pass --blip-model PATH")  # the CLI still says it
    text = handlers.caption_error_text(e, "blip")
    assert "--blip-model" not in text and "/c/blip" in text and "'clip'" in text and "Save captions" in text
    assert handlers.caption_error_text(DatasetError("no images"), "blip") == "⚠ no images"


def test_the_missing_blip_model_error_is_a_model_missing_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lora_trainer.caption import blip
    from lora_trainer.errors import ModelMissingError

    err = blip._missing_error("Salesforce/blip-image-captioning-base")
    assert isinstance(err, ModelMissingError) and "--blip-model" not in err.message


def test_a_port_in_use_is_one_line_naming_port(capsys: pytest.CaptureFixture[str]):
    import socket

    from lora_trainer.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port}: .*in use.*--port {port + 1}"):
            appmod.check_port("127.0.0.1", port)
        assert main(["app", "--port", str(port), "--data", "/nonexistent/lt-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--port" in err[0] and "Traceback" not in err[0]
    appmod.check_port("127.0.0.1", port)  # free again: no error


def test_preset_dropdown_shows_the_preset_the_defaults_came_from(tmp_path: Path):
    defaults = appmod.demo_defaults(tmp_path / "d", tmp_path / "o")
    assert presets.preset_of(defaults) == "cpu (demo)"
    assert presets.preset_of(TrainConfig()) is None
    assert presets.preset_of(build_config(presets.preset_values("8 GB", "sdxl")), "sdxl") == "8 GB"
    from lora_trainer.hosts.standalone import StandaloneHost

    tab = __import__("lora_trainer.ui.tab", fromlist=["build_tab"]).build_tab(StandaloneHost(lora_dir=tmp_path),
                                                                              defaults=defaults)
    preset = next(b for b in tab.blocks.values() if getattr(b, "elem_id", None) == "lt-preset")
    assert preset.value == "cpu (demo)"


def test_optional_numbers_are_number_inputs_like_the_other_numbers():
    from lora_trainer.ui.fields import make_field

    for path in ("train.max_train_steps", "optim.unet_lr", "sample.width", "network.rank"):
        assert isinstance(make_field(path), gr.Number), path
    box = make_field("train.max_train_steps")
    assert box.value is None and make_field("network.rank").value == 16
    assert isinstance(make_field("model.vae"), gr.Textbox)  # an optional path stays text
    assert isinstance(make_field("data.prefetch"), gr.Textbox)  # 0 (off) and empty (default) differ


def test_the_gradio3_poll_loop_remembers_what_it_sent():
    """gradio 3.x repeats a periodic event with its first inputs: without carrying the poll's
    memory itself, every poll re-sent the Test list's value and reset the user's choice."""
    seen_by_call: list[Any] = []

    def poll(memory: Any) -> list[Any]:
        seen_by_call.append(memory)
        return ["progress", len(seen_by_call)]

    loop = compat.carrying_memory(poll, 0)(None)
    assert [next(loop)[-1] for _ in range(3)] == [1, 2, 3]
    assert seen_by_call == [None, 1, 2]


def test_continue_takes_a_stopped_run_on_from_its_checkpoint_with_its_own_settings(tmp_path: Path):
    """Stop, then Continue: the run goes on from the step it stopped at, with the settings it
    started with (not the form's), and ends with the LoRA a run never stopped would have made;
    the page shows Continue only while there is a stopped run to continue."""
    from types import SimpleNamespace

    from lora_trainer.ui.train_section import _poll
    from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config

    data, host = make_data(tmp_path / "data", n=3), TinyHost("sd1")
    values = {"train.max_train_steps": 4, "output.save_precision": "fp32", "output.overwrite": True}

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            jobs.current().stop()

    ctx = SimpleNamespace(host=host, prefix="lt-", remember_last_run=False,
                          defaults=build_config({"output.output_dir": str(tmp_path / "out")}))
    jobs.clear_finished()
    with pytest.raises(ConfigError, match="no stopped run to continue"):
        handlers.continue_stopped(host)
    first = jobs.start(tiny_config(data, tmp_path / "out", **values), host, callbacks=[stop_at_two])
    first.join()
    seen = _poll(ctx, None)[-1]
    assert first.snapshot()["status"] == "stopped" and first.snapshot()["step"] == 2
    assert _poll(ctx, None)[8]["visible"] is True
    job, said = handlers.continue_stopped(host)
    assert said == "continuing 'tiny' from step 2 with the settings it started with"
    assert job.config.train.resume == "latest" and job.config.train.max_train_steps == 4
    job.join()
    snap = job.snapshot()
    assert snap["status"] == "done" and snap["step"] == 4 and [s for s, _ in snap["losses"]] == [3, 4]
    assert _poll(ctx, seen)[8]["visible"] is False
    straight = jobs.start(tiny_config(data, tmp_path / "straight", **values), host)
    straight.join()
    a = lora_tensors(tmp_path / "straight" / "tiny.safetensors")
    b = lora_tensors(tmp_path / "out" / "tiny.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    jobs.clear_finished()


def test_after_a_restart_the_page_offers_the_unfinished_run_and_continue_takes_it_on(tmp_path: Path):
    """The WebUI closed mid-run (nothing of the run is left in memory): a page loaded afterwards
    says which run is unfinished and at which step, and Continue takes it on from its checkpoint
    with the settings saved with it, to the LoRA a run never stopped would have made. A run that
    finished is not offered."""
    from types import SimpleNamespace

    from lora_trainer.ui.train_section import _poll
    from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config

    data, host, out = make_data(tmp_path / "data", n=3), TinyHost("sd1"), tmp_path / "out"
    values = {"train.max_train_steps": 4, "output.save_precision": "fp32", "train.save_steps": 1}

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            jobs.current().stop()

    ctx = SimpleNamespace(host=host, prefix="lt-", remember_last_run=False,
                          defaults=build_config({"output.output_dir": str(out)}))
    jobs.clear_finished()
    done = jobs.start(tiny_config(data, out, **values, **{"output.output_name": "done"}), host)
    done.join()
    jobs.clear_finished()
    first = _poll(ctx, None)
    assert first[6] == compat.update() and first[8]["visible"] is False  # a finished run is not offered
    # the form's settings differ from the run's: Continue must take the run's own
    cat = tiny_config(data, out, **values, **{"output.output_name": "cat", "network.rank": 2})
    jobs.start(cat, host, callbacks=[stop_at_two]).join()
    jobs.clear_finished()  # the WebUI was restarted
    first = _poll(ctx, None)
    assert first[6].startswith("an unfinished run: 'cat' at step 2 of 4 (checkpoint of ")
    assert first[6].endswith("); Continue takes it on from there") and first[8]["visible"] is True
    assert _poll(ctx, first[-1])[6] == compat.update()  # said once per page
    job, said = handlers.continue_stopped(host, out)
    assert said == "continuing 'cat' from step 2 with the settings it started with"
    job.join()
    snap = job.snapshot()
    assert snap["status"] == "done" and [s for s, _ in snap["losses"]] == [3, 4]
    assert handlers.unfinished_run(out) is None  # finished now
    straight = jobs.start(tiny_config(data, tmp_path / "straight", **values, **{"output.output_name": "cat",
                                                                                  "network.rank": 2}), host)
    straight.join()
    a, b = lora_tensors(tmp_path / "straight" / "cat.safetensors"), lora_tensors(out / "cat.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    jobs.clear_finished()
    with pytest.raises(ConfigError, match="no stopped run to continue"):
        handlers.continue_stopped(host, out)


def test_an_unfinished_run_in_another_output_folder_is_offered_once_that_folder_is_entered(tmp_path: Path):
    """A run in an output folder of the user's choosing, then a restart: the page's first poll
    looks in the default folder only, so leaving the form's output folder field offers that
    folder's unfinished run, and Continue takes it on from the folder in the form."""
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import _poll
    from tests.train_helpers import TinyHost, make_data, tiny_config

    data, host = make_data(tmp_path / "data", n=3), TinyHost("sd1")
    default_out, chosen = tmp_path / "out", tmp_path / "chosen"

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            jobs.current().stop()

    jobs.clear_finished()
    run = tiny_config(data, chosen, **{"train.max_train_steps": 4, "train.save_steps": 1, "output.output_name": "dog"})
    jobs.start(run, host, callbacks=[stop_at_two]).join()
    jobs.clear_finished()  # the WebUI was restarted
    blocks = build_tab(host, defaults=build_config({"output.output_dir": str(default_out)}))
    fns = list(blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns)
    offer = next(f for f in fns if getattr(f.fn, "__name__", "") == "offer_unfinished")
    go_on = next(f for f in fns if getattr(f.fn, "__name__", "") == "do_continue")
    # both read the form's output folder
    assert [c.elem_id for c in offer.inputs] == ["lt-f-output-output-dir", "lt-train-msg"]
    assert [c.elem_id for c in offer.outputs] == ["lt-train-msg", "lt-continue"]
    assert [c.elem_id for c in go_on.inputs] == ["lt-f-output-output-dir"]
    ctx = SimpleNamespace(host=host, prefix="lt-", remember_last_run=False,
                          defaults=build_config({"output.output_dir": str(default_out)}))
    assert _poll(ctx, None)[8]["visible"] is False  # nothing unfinished in the default folder
    said, shown = offer.fn(str(chosen), "")
    assert said.startswith("an unfinished run: 'dog' at step 2 of 4") and shown["visible"] is True
    # back to a folder without one: the offer is taken back; another message stays
    said2, shown2 = offer.fn(str(default_out), said)
    assert said2 == "" and shown2["visible"] is False
    assert offer.fn(str(default_out), "preset 8 GB applied") == [compat.update(), compat.update(visible=False)]
    with pytest.raises(ConfigError, match="no stopped run to continue"):
        handlers.continue_stopped(host, default_out)
    said3, _, *form = go_on.fn(str(chosen))  # Continue with the chosen folder in the form
    assert said3 == "continuing 'dog' from step 2 with the settings it started with"
    assert str(chosen) in form and "dog" in form  # the form shows the continued run's folder and name
    job = jobs.current()
    assert job.config.output.output_dir == str(chosen) and job.config.output.output_name == "dog"
    job.join()
    assert job.snapshot()["status"] == "done" and handlers.unfinished_run(chosen) is None
    assert offer.fn(str(chosen), said)[1]["visible"] is False
    jobs.clear_finished()
    # a folder that cannot be read offers nothing, with no error
    blocked = tmp_path / "blocked"
    (blocked / "checkpoints").mkdir(parents=True)
    real_iterdir = Path.iterdir

    def refuse(self: Path) -> Any:
        if self == blocked / "checkpoints":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "iterdir", refuse)
        assert offer.fn(str(blocked), said) == ["", compat.update(visible=False)]
        # nor does a page's first poll when it is the default output folder
        page = SimpleNamespace(host=host, prefix="lt-", remember_last_run=False,
                               defaults=build_config({"output.output_dir": str(blocked)}))
        on_load = _poll(page, None)
        assert on_load[6] == compat.update() and on_load[8]["visible"] is False


def test_the_form_filled_from_a_run_does_not_carry_its_resume():
    """A page loaded during a continued run, or Continue itself, fills the form with the run's
    settings; its train.resume stays out, or the next Start (another name, another rank) would
    take the old run's checkpoint."""
    from types import SimpleNamespace

    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.fields import UI_FIELDS
    from lora_trainer.ui.train_section import form_values_of

    ctx = SimpleNamespace(host=StandaloneHost(), paths=list(UI_FIELDS))
    run = build_config({"train.resume": "output/checkpoints/cat/step-000005", "network.rank": 2,
                        "output.output_name": "cat"})
    values = dict(zip(UI_FIELDS, form_values_of(ctx, run), strict=True))
    assert values["network.rank"] == 2 and values["output.output_name"] == "cat"
    assert not values["train.resume"]


def page_load_outputs(blocks: Any) -> tuple[Any, ...]:
    """What the tab's page-load handler sends: ({field path: value}, preset label, Test LoRA list,
    the message under Start), checked against the components it sends them to."""
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    load = next(f for f in fns if getattr(f.fn, "__name__", "") == "restore")
    assert [c.elem_id for c in load.outputs[-3:]] == ["lt-preset", "lt-test-lora", "lt-train-msg"]
    *form, preset, loras, msg = load.fn()
    return dict(zip(blocks.lt_context.paths, form, strict=True)), preset, loras, msg


def test_after_a_restart_the_webuis_page_shows_the_last_runs_settings(tmp_path: Path):
    """The WebUI was restarted after a run: its page shows that run's settings (dataset, name,
    rank, steps) and says whose they are, not the defaults; an unfinished run is offered instead
    of that line. A config.yaml of the user's, or one that cannot be read, leaves the defaults."""
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost, make_data, tiny_config

    data, host, out = make_data(tmp_path / "data", n=3), TinyHost("sd1"), tmp_path / "out"
    defaults = build_config({"output.output_dir": str(out)})

    def page_load(remember: bool = True) -> tuple[dict[str, Any], Any, Any]:
        form, preset, loras, msg = page_load_outputs(build_tab(host, defaults=defaults, remember_last_run=remember))
        return {**form, "preset": preset}, loras, msg

    jobs.clear_finished()
    form, _, msg = page_load()  # nothing has run: the form keeps its defaults
    assert all(v == compat.update() for v in form.values()) and msg == compat.update()
    run = tiny_config(data, out, **{"output.output_name": "cat", "network.rank": 2, "train.max_train_steps": 3})
    jobs.start(run, host).join()
    jobs.clear_finished()  # the WebUI was restarted
    form, loras, msg = page_load()
    assert (form["output.output_name"], form["network.rank"], form["train.max_train_steps"]) == ("cat", 2, 3)
    assert form["data.train_data_dir"] == str(data) and not form["train.resume"]
    assert form["preset"] == "custom"  # the run's values are no preset's: not the label the page was built with
    assert msg.startswith("the form holds the settings of the last run, 'cat' (started ")
    assert msg.endswith("); Start training begins a new run with them") and loras == compat.update()
    form, _, msg = page_load(remember=False)  # the app: its command line's defaults
    assert form["output.output_name"] == compat.update() and msg == compat.update()

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            jobs.current().stop()

    dog = tiny_config(data, out, **{"output.output_name": "dog", "train.max_train_steps": 4, "train.save_steps": 1})
    jobs.start(dog, host, callbacks=[stop_at_two]).join()
    jobs.clear_finished()
    form, _, msg = page_load()
    assert form["output.output_name"] == "dog" and msg == compat.update()  # the first poll offers Continue
    (out / "config.yaml").write_text("network:\n  rank: 64\n", encoding="utf-8")  # the user's own file
    form, _, msg = page_load()
    assert form["network.rank"] == compat.update() and msg == compat.update()
    damaged = "network:\n  rank: [\n"
    (out / "config.yaml").write_text(damaged, encoding="utf-8")
    (out / "logs" / "dog" / "config.yaml").write_text(damaged, encoding="utf-8")
    assert page_load()[2] == compat.update()
    assert handlers.last_run(tmp_path / "nothing here") is None


def test_after_a_restart_the_webuis_page_finds_a_run_in_another_output_folder(tmp_path: Path):
    """A run started (tab or API) in another folder than the default output folder is named in
    the default folder's last_run_folder.txt: the page after a restart shows its settings and
    its first poll offers to continue it there; a later run in the default folder removes the
    note. The app (no remembering) writes none."""
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import _poll
    from tests.train_helpers import TinyHost, make_data, tiny_config

    data, host = make_data(tmp_path / "data", n=3), TinyHost("sd1")
    default_out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    defaults = build_config({"output.output_dir": str(default_out)})
    note = default_out / handlers.RUN_FOLDER_FILE

    def stop_at_two(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 2:
            jobs.current().stop()

    build_tab(host, defaults=defaults)  # the app
    jobs.clear_finished()
    jobs.start(tiny_config(data, elsewhere, **{"train.max_train_steps": 2}), host).join()
    assert not note.exists()
    blocks = build_tab(host, defaults=defaults, remember_last_run=True)  # the WebUI's tab
    dog = tiny_config(data, elsewhere, **{"output.output_name": "dog", "train.max_train_steps": 4,
                                          "train.save_steps": 1})
    jobs.start(dog, host, callbacks=[stop_at_two]).join()
    assert note.read_text(encoding="utf-8") == f"{elsewhere.absolute()}\n"
    jobs.clear_finished()  # the WebUI was restarted
    form, _, _, msg = page_load_outputs(blocks)
    assert (form["output.output_name"], form["output.output_dir"]) == ("dog", str(elsewhere))
    first_poll = _poll(blocks.lt_context, None)
    assert first_poll[6].startswith("an unfinished run: 'dog' at step 2 of 4") and first_poll[8]["visible"] is True
    jobs.start(tiny_config(data, default_out, **{"output.output_name": "cat", "train.max_train_steps": 1}), host).join()
    assert not note.exists()
    jobs.clear_finished()
    assert page_load_outputs(blocks)[0]["output.output_name"] == "cat"
    note.write_text(f"{tmp_path / 'gone'}\n", encoding="utf-8")  # a folder since removed: the default's run
    assert page_load_outputs(blocks)[0]["output.output_name"] == "cat"


def test_the_sample_prompt_of_a_wildcard_caption_is_its_first_choices() -> None:
    """With enable_wildcard the prompt filled from the first caption reads as a caption: its
    first line and the first option of each {a|b} (the same every time); off, it is the caption
    as written, as training uses it."""
    from lora_trainer.config import DataConfig

    item = SimpleNamespace(rel="a.png", caption="a {red|blue} car, {day|{dusk|night}}\nanother line")

    def prompt(**values: Any) -> str:
        return handlers.sample_prompt_of(SimpleNamespace(train_items=[item], config=DataConfig(**values)))[1]

    assert {prompt(enable_wildcard=True, trigger_word="sks") for _ in range(5)} == {"sks, a red car, day"}
    assert prompt() == item.caption


def test_an_empty_sample_prompt_is_filled_from_the_datasets_captions_once(tmp_path: Path):
    """With no sample prompt in the form, loading the dataset, captioning it or saving its
    captions fills the prompt (and an empty Test prompt) with the caption the first image trains
    with, trigger word included, and says so; a prompt the user typed, or cleared after the page
    filled it, is left alone. So a run shows samples (and writes its LoRA's preview) by default."""
    from lora_trainer.data.captions import read_captions
    from lora_trainer.ui.fields import values_from_config
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost, make_data

    data = make_data(tmp_path / "data", n=3)
    first = read_captions(data, None, ".txt")["demo_000.png"]

    class Numbered:
        def caption(self, images: list[Any]) -> list[str]:
            return [f"a drawing {i}" for i in range(len(images))]

    blocks = build_tab(TinyHost("sd1"), defaults=build_config({"output.output_dir": str(tmp_path / "out")}),
                       captioner=Numbered())
    ctx = blocks.lt_context
    fns = list(blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns)

    def handler(name: str) -> Any:
        found = next(f for f in fns if getattr(f.fn, "__name__", "") == name)
        assert [getattr(c, "elem_id", None) for c in found.outputs[-3:-1]] == ["lt-f-sample-prompt", "lt-test-prompt"]
        return found.fn

    def form(**values: Any) -> list[Any]:
        cfg = build_config({"data.train_data_dir": str(data), **values}, base=ctx.defaults)
        return values_from_config(cfg, ctx.paths)

    scan = handler("do_scan")
    summary, *_, prompt, test_prompt, offered = scan(False, "", *form())
    assert (prompt, test_prompt, offered) == (first, first, True)
    assert f"The sample prompt (Train) is now the caption of demo_000.png: '{first}'." in summary
    summary, *_, prompt, test_prompt, offered = scan(False, "", *form(**{"data.trigger_word": "zkw"}))
    assert prompt == f"zkw, {first}" and test_prompt == prompt
    affixed = form(**{"data.caption_prefix": "art |||", "data.caption_suffix": ", flat",
                      "data.keep_tokens_separator": "|||"})
    assert scan(False, "", *affixed)[-3] == f"art, {first}, flat"  # as training sees it: no separator
    keep = (compat.update(), compat.update(), False)
    assert tuple(scan(True, "", *form())[-3:]) == (*keep[:2], True)  # filled once: a prompt cleared since stays empty
    mine = scan(False, "", *form(**{"sample.prompt": "my prompt"}))
    assert tuple(mine[-3:]) == keep and "sample prompt" not in mine[0]
    assert tuple(scan(False, "a test prompt", *form())[-3:]) == (first, compat.update(), True)

    # a folder without captions fills nothing on load; its captions, once saved or made, do
    (data / "metadata.csv").unlink()
    summary, *_, prompt, test_prompt, offered = scan(False, "", *form())
    assert (prompt, test_prompt, offered) == keep and "sample prompt" not in summary
    table, _, status, prompt, test_prompt, offered = handler("do_save")(
        [["demo_000.png", ""], ["demo_001.png", "a red ball"]], "txt", False, "", *form())
    assert (prompt, test_prompt, offered) == ("a red ball", "a red ball", True)
    assert status.endswith("The sample prompt (Train) is now the caption of demo_001.png: 'a red ball'. Samples of it "
                           "show what the LoRA learns: one at the end of the run, the LoRA's preview card, and one "
                           "every 'every n steps'; edit it, or clear it for none.")
    *_, (table, _, status, prompt, test_prompt, offered) = handler("do_caption")(
        "blip", "overwrite", "txt", False, "", *form())
    assert status.startswith("captioned 3 image(s)") and (prompt, offered) == ("a drawing 0", True)
    *_, last = handler("do_caption")("blip", "overwrite", "txt", True, "", *form())
    assert tuple(last[-3:]) == (*keep[:2], True)


def test_the_tabs_config_load_takes_a_lora_scripts_toml_and_names_the_keys_without_effect(tmp_path: Path):
    """Config as YAML: a lora-scripts .toml file (or the same keys typed as YAML) fills the form,
    and the status names the keys that change nothing here, each with why."""
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost

    blocks = build_tab(TinyHost("sd1"))
    paths = blocks.lt_context.paths
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in (blocks.fns.values() if isinstance(blocks.fns, dict)
                                                         else blocks.fns)}
    toml = tmp_path / "lora.toml"
    toml.write_text('[additional_network_arguments]\nnetwork_dim = 8\n[training_arguments]\nxformers = true\n'
                    'resolution = "640,640"\n[saving_arguments]\nlogging_dir = "./logs"\n', encoding="utf-8")
    *form, preset, _, status = fns["load_file"](str(toml))
    import importlib.util
    import sys

    if sys.version_info < (3, 11) and importlib.util.find_spec("tomli") is None:  # a WebUI's Python 3.10
        assert status == (f"⚠ {toml}: reading a .toml config needs Python 3.11+ or the tomli package (pip install "
                          "tomli, into this Python); or give the same keys as YAML")
    else:
        values = dict(zip(paths, form, strict=True))
        assert (values["network.rank"], values["data.resolution"], preset) == (8, 640, "custom")
        assert status == (f"loaded {toml}; keys of other trainers, kept without effect here:\n"
                          "- `xformers`: attention runs PyTorch's fused kernels\n"
                          "- `logging_dir`: logs go to &lt;output_dir>/logs/&lt;output_name>")
    *form, _, status = fns["yaml_to_form"]("network_dim: 4\nsave_every_n_epochs: 2\nsave_n_epoch_ratio: 0\nlowram: true\n")
    values = dict(zip(paths, form, strict=True))
    assert (values["network.rank"], values["train.save_every_n_epochs"]) == (4, 2)
    assert status == ("loaded into the form; keys of other trainers, kept without effect here:\n"
                      "- `save_n_epoch_ratio`: saves are set by train.save_every_n_epochs or train.save_steps\n"
                      "- `lowram`: set by the trainer itself")
    assert fns["yaml_to_form"]("network_dim: 4\n")[-1] == "loaded into the form"


def test_a_webuis_first_page_starts_from_auto_and_the_preset_label_follows_a_loaded_form(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A WebUI page with no run to show starts from the "auto" preset (sized for the loaded model
    and the card's free memory at that moment) and says what it picked, rather than plain
    defaults under a "custom" label; a form loaded from YAML shows the preset its values are, or
    "custom"; and only the user's choice applies a preset (the label a loaded form sets must not
    apply one over it)."""
    from lora_trainer.ui.fields import values_from_config
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost

    monkeypatch.setattr(presets, "gpu_free_gb", lambda: None)  # no GPU here: auto is the CPU demo preset
    defaults = build_config({"output.output_dir": str(tmp_path / "out")})
    jobs.clear_finished()
    blocks = build_tab(TinyHost("sd1"), defaults=defaults, remember_last_run=True, start_auto=True)
    by_id = {getattr(b, "elem_id", None): b for b in blocks.blocks.values()}
    assert by_id["lt-preset"].value == "auto"
    form, preset, loras, msg = page_load_outputs(blocks)
    demo = presets.preset_values("cpu (demo)")
    expected = dict(zip(demo, values_from_config(build_config(demo), list(demo)), strict=True))
    sent = {p: (u["value"] if isinstance(u, dict) else u.value) for p, u in form.items() if u != compat.update()}
    assert sent == {p: v for p, v in expected.items() if p in form}
    assert sent["data.resolution"] == 64 and sent["network.rank"] == 4  # not the plain defaults' 512 and 16
    assert (msg, preset) == ("auto: no GPU found, so the CPU demo settings", "auto") and loras == compat.update()
    assert page_load_outputs(build_tab(TinyHost("sd1"), defaults=defaults, remember_last_run=True))[3] \
        == compat.update()  # without start_auto (the app): its own defaults, nothing said

    fns = list(blocks.fns.values()) if isinstance(blocks.fns, dict) else list(blocks.fns)
    named = {getattr(f.fn, "__name__", ""): f.fn for f in fns}
    yaml = __import__("yaml").safe_dump(demo)
    *_, label, status = named["yaml_to_form"](yaml)
    assert (label, status) == ("cpu (demo)", "loaded into the form")
    assert named["yaml_to_form"](yaml + "network.rank: 5\n")[-2] == "custom"
    deps = blocks.config["dependencies"]
    [applier] = [i for i, f in enumerate(fns) if getattr(f.fn, "__name__", "") == "apply_preset"]
    targets = deps[applier]["targets"]
    events = {t[1] for t in targets} if isinstance(targets[0], (list, tuple)) else {deps[applier]["trigger"]}
    assert events == {"input"}


def test_a_webuis_tab_hides_the_fields_it_does_not_read_and_keeps_their_values():
    """In a WebUI the loaded checkpoint trains on the WebUI's device in its weights, and only
    SD1/SD2/SDXL: the model section (but the base model) and the rectified-flow settings are
    hidden there, shown standalone; a loaded file's values for them still go through the form."""
    from lora_trainer.hosts.base import LoadedModel
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import NOT_READ_IN_A_WEBUI
    from tests.train_helpers import TinyHost

    class WebUILike(TinyHost):
        def loaded_model(self) -> LoadedModel:
            return LoadedModel("tiny.safetensors [b1144b71ec]", "sd1")

    assert {"model.vae", "model.t5xxl", "model.device", "train.discrete_flow_shift"} <= NOT_READ_IN_A_WEBUI
    assert "model.base_model" not in NOT_READ_IN_A_WEBUI
    in_webui, standalone = build_tab(WebUILike("sd1")), build_tab(TinyHost("sd1"))
    for blocks, hidden in ((in_webui, NOT_READ_IN_A_WEBUI), (standalone, set())):
        fields = blocks.lt_context.fields
        assert {p for p, comp in fields.items() if comp.visible is False} == hidden
    fns = in_webui.fns.values() if isinstance(in_webui.fns, dict) else in_webui.fns
    yaml_to_form = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "yaml_to_form")
    *form, _, status = yaml_to_form("model:\n  vae: /models/vae.safetensors\nnetwork_dim: 4\n")
    values = dict(zip(in_webui.lt_context.paths, form, strict=True))
    assert status == "loaded into the form" and values["model.vae"] == "/models/vae.safetensors"


def test_images_dropped_without_a_folder_go_into_a_new_one_named_after_the_lora_and_are_shown(tmp_path: Path):
    """A newcomer drops images before choosing a folder: they land in <output_dir>/datasets/<name>,
    the folder field names it, and the dataset is shown as Load dataset shows it; dropped again
    with that folder in the field, the files join it, none overwritten."""
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.ui.fields import values_from_config
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost

    demo = make_demo_dataset(tmp_path / "demo", n=3)
    files = sorted(str(p) for p in demo.iterdir())  # three images and their metadata.csv
    blocks = build_tab(TinyHost("sd1"))
    ctx = blocks.lt_context
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    do_upload = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "do_upload")
    cfg = build_config({"output.output_dir": str(tmp_path / "out"), "output.output_name": "my_cat",
                        "data.train_data_dir": ""}, base=ctx.defaults)
    values = values_from_config(cfg, ctx.paths)
    folder, summary, gallery, *_ = do_upload(files, False, "", *values)
    expected = tmp_path / "out" / "datasets" / "my_cat"
    assert folder == str(expected) and sorted(p.name for p in expected.iterdir()) == sorted(Path(f).name for f in files)
    assert summary.startswith(f"added 4 file(s) to {expected}") and "**3 images** ready" in summary
    assert len(gallery) == 3
    values[ctx.paths.index("data.train_data_dir")] = folder
    folder, summary, gallery, *_ = do_upload(files[:1], True, "", *values)
    assert folder == str(expected) and len(gallery) == 4 and (expected / f"{Path(files[0]).stem}_1.png").is_file()
    values[ctx.paths.index("output.output_name")] = "a/b"  # no folder, and a name no folder can take
    values[ctx.paths.index("data.train_data_dir")] = ""
    folder, summary, *_ = do_upload(files[:1], True, "", *values)
    assert summary.startswith("⚠ output.output_name") and folder == compat.update()


def test_a_loaded_config_in_a_webui_keeps_the_webuis_model_in_the_base_model_field(tmp_path: Path):
    """YAML → form in a WebUI: the base-model field keeps naming the WebUI's model, which is what
    a run trains there, not the file's base_model; the file's other values (resume too) go in."""
    from lora_trainer.hosts.base import LoadedModel
    from lora_trainer.ui.tab import build_tab
    from tests.train_helpers import TinyHost

    class WebUILike(TinyHost):
        def loaded_model(self) -> LoadedModel:
            return LoadedModel("tiny.safetensors [b1144b71ec]", "sd1")

    blocks = build_tab(WebUILike("sd1"))
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    yaml_to_form = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "yaml_to_form")
    *form, _, status = yaml_to_form("base_model: /models/other.safetensors\nnetwork_dim: 4\nresume: latest\n")
    values = dict(zip(blocks.lt_context.paths, form, strict=True))
    assert status == "loaded into the form" and values["network.rank"] == 4 and values["train.resume"] == "latest"
    assert values["model.base_model"] == "tiny.safetensors [b1144b71ec]"
