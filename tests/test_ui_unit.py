"""The tab's parts without a browser: gradio shims, field map <-> TrainConfig, presets, job
registry, handlers, the app's argument checks."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lora_trainer import jobs
from lora_trainer.config import TrainConfig, all_field_paths, build_config
from lora_trainer.errors import ConfigError, DatasetError, HostError
from lora_trainer.train.events import TrainEvent, WorkerRun
from lora_trainer.ui import fields, handlers, presets
from lora_trainer.ui.fields import UI_FIELDS, config_from_values, config_from_yaml_text, values_from_config

gr = pytest.importorskip("gradio")
from lora_trainer.ui import app as appmod  # noqa: E402
from lora_trainer.ui import compat  # noqa: E402

# -- compat ---------------------------------------------------------------------------------


def test_js_kwarg_matches_installed_gradio():
    kw = compat.js_kwargs("() => 1")
    assert list(kw) == (["_js"] if compat.version()[0] < 4 else ["js"])
    assert compat.js_kwargs(None) == {}


@pytest.mark.parametrize("obj, expected", [
    ("/tmp/a.png", "/tmp/a.png"),
    (Path("/tmp/b.png"), "/tmp/b.png"),
    ({"name": "/tmp/c.png"}, "/tmp/c.png"),
    ({"path": "/tmp/d.png", "name": "d.png"}, "/tmp/d.png"),
    (type("Wrapper", (), {"name": "/tmp/e.png"})(), "/tmp/e.png"),
    (None, None),
])
def test_file_path_of_every_upload_shape(obj: Any, expected: str | None):
    assert compat.file_path(obj) == expected


def test_file_paths_accepts_single_and_lists():
    assert compat.file_paths(None) == []
    assert compat.file_paths("/x.png") == ["/x.png"]
    assert compat.file_paths(["/x.png", {"name": "/y.png"}, None]) == ["/x.png", "/y.png"]


def test_components_build_on_installed_gradio():
    with gr.Blocks():
        box = compat.textbox(copy_button=True, label="t")
        table = compat.dataframe(headers=["file", "caption"], height=200)
        plot = compat.line_plot(x="step", y="loss", color="series")
        gal = compat.gallery(columns=3, height=200)
    if compat.accepts(gr.Textbox, "show_copy_button"):
        assert box.show_copy_button
    else:
        assert "copy" in box.buttons
    height_attr = "max_height" if compat.accepts(gr.Dataframe, "max_height") else "height"
    assert getattr(table, height_attr) == 200
    assert plot.value is not None  # an empty frame, never None (4.44 breaks on None)
    assert isinstance(gal, gr.Gallery)


def test_empty_frame_is_a_dataframe_not_none():
    frame = compat.empty_frame(["step", "loss"])
    assert list(frame.columns) == ["step", "loss"] and len(frame) == 0


def test_css_goes_to_blocks_or_launch_but_not_both():
    b, launch = compat.blocks_kwargs("x{}"), compat.launch_kwargs("x{}")
    assert (b == {"css": "x{}"}) != (launch == {"css": "x{}"})


# -- field map ------------------------------------------------------------------------------


def test_ui_fields_cover_every_image_config_field():
    assert set(UI_FIELDS) == set(all_field_paths()) - {"task"}


def test_every_field_has_a_label_of_its_own():
    # A1111 and Forge save the tab's values in ui-config.json keyed by label: two fields with one
    # label (train.guidance_scale and sample.guidance_scale were) share one saved value, and a
    # training run got the sample's guidance 7.0 as its Flux training guidance.
    labels = [fields.label_of(p) for p in fields.UI_FIELDS]
    assert sorted(lab for lab in set(labels) if labels.count(lab) > 1) == []


def test_field_values_round_trip_through_config():
    cfg = build_config({"network.rank": 12, "network.alpha": 3.5, "optim.unet_lr": 2e-4,
                        "network.target_modules": ["to_q", "to_v"], "train.max_train_steps": 77,
                        "data.crop": "random", "sample.width": None, "output.output_name": "x y"})
    values = values_from_config(cfg, UI_FIELDS)
    by_path = dict(zip(UI_FIELDS, values, strict=True))
    assert by_path["network.target_modules"] == "to_q, to_v"
    assert by_path["sample.width"] is None  # an empty number input
    assert by_path["train.max_train_steps"] == 77 and by_path["output.output_name"] == "x y"
    again = config_from_values(UI_FIELDS, values)
    assert again == cfg


def test_component_value_types_coerce_like_the_ui_sends_them():
    # gr.Number sends floats (None when empty), old pages may send text, checkboxes send bools
    paths = ["network.rank", "train.max_train_steps", "optim.text_encoder_lr", "network.train_text_encoder"]
    cfg = config_from_values(paths, [8.0, " 30 ", "", True])
    assert cfg.network.rank == 8 and cfg.train.max_train_steps == 30
    assert cfg.optim.text_encoder_lr is None and cfg.network.train_text_encoder is True
    cfg = config_from_values(paths, [8.0, 40.0, None, False])
    assert cfg.train.max_train_steps == 40 and cfg.optim.text_encoder_lr is None
    # an emptied number input sends 0 on gradio 3.x: empty for these fields, where 0 means nothing else
    cfg = config_from_values(paths + ["train.min_snr_gamma", "data.prefetch"], [8.0, 0.0, 0.0, False, 0.0, "0"])
    assert cfg.train.max_train_steps is None and cfg.optim.text_encoder_lr is None and cfg.train.min_snr_gamma is None
    assert cfg.data.prefetch == 0  # here 0 is a setting of its own (off): still a text box




def test_bad_field_value_names_the_field():
    with pytest.raises(ConfigError, match="network.rank"):
        config_from_values(["network.rank"], [0])
    with pytest.raises(ValueError):
        config_from_values(["network.rank"], [1, 2])


def test_yaml_text_with_aliases_loads():
    cfg = config_from_yaml_text("lora_rank: 6\ntrain_data_dir: /data\noptim:\n  learning_rate: 0.0005\n")
    assert cfg.network.rank == 6 and cfg.data.train_data_dir == "/data" and cfg.optim.learning_rate == 5e-4
    with pytest.raises(ConfigError, match="lora_rnak|did you mean"):
        config_from_yaml_text("lora_rnak: 6\n")
    with pytest.raises(ConfigError, match="YAML"):
        config_from_yaml_text("a: [unclosed\n")


def test_tab_field_map_holds_every_field_by_path():
    from lora_trainer.hosts.standalone import StandaloneHost

    tab = __import__("lora_trainer.ui.tab", fromlist=["build_tab"]).build_tab(StandaloneHost())
    ctx = tab.lt_context
    assert set(ctx.fields) == set(UI_FIELDS)
    for path, comp in ctx.fields.items():
        assert comp.elem_id.startswith("lt-f-"), path
    # the defaults shown are the config defaults, and rebuild the same config
    values = [comp.value for comp in ctx.inputs]
    assert ctx.config(values) == TrainConfig()
    by_id = {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["lt-preset"].value == "custom"  # no preset matches the plain defaults: said so, not blank
    assert by_id["lt-stop"].variant == "secondary"  # red only while a run is alive
    assert isinstance(ctx.fields["train.max_train_steps"], gr.Number)




# -- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("memory, expected", [
    (None, "cpu (demo)"), (5.8, "6 GB"), (7.6, "8 GB"), (11.7, "12 GB"), (15.6, "16 GB"), (23.6, "24 GB"),
    (79.2, "24 GB"), (4.0, "6 GB"),
])
def test_auto_preset_by_memory(memory: float | None, expected: str):
    assert presets.auto_preset(memory, detect=False) == expected


@pytest.mark.parametrize("name", presets.PRESET_NAMES[1:])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_every_preset_is_a_valid_config(name: str, arch: str):
    values = presets.preset_values(name, arch)
    cfg = build_config(values)
    for path, value in values.items():
        assert cfg.get(path) == value


def test_presets_use_less_memory_on_smaller_cards():
    small, big = presets.preset_values("6 GB"), presets.preset_values("24 GB")
    assert small["train.gradient_checkpointing"] and not big["train.gradient_checkpointing"]
    assert small["train.batch_size"] <= big["train.batch_size"] and small["network.rank"] <= big["network.rank"]
    assert presets.preset_values("8 GB", "sdxl")["data.resolution"] == 1024


def test_auto_without_gpu_is_the_cpu_demo_preset(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(presets, "gpu_free_gb", lambda: None)
    assert presets.preset_values("auto") == presets.preset_values("cpu (demo)")
    with pytest.raises(ConfigError, match="preset"):
        presets.preset_values("3 GB")


# -- job registry ---------------------------------------------------------------------------


class StepTrainer(WorkerRun):
    """A trainer double with the Trainer surface (WorkerRun's commands, state and worker thread):
    it emits real TrainEvents into a real RunState until told to stop (the registry is under test)."""

    def __init__(self, config: TrainConfig, host: Any, callbacks: list[Any]) -> None:
        super().__init__(callbacks)
        self.config = config
        self.saves = 0

    def run(self) -> None:
        step = 0
        while not self.commands.stop_requested and step < 100_000:  # until told (the cap: a test that forgot)
            step += 1
            self.state.update(TrainEvent("step", step=step, total_steps=500, loss=1.0 / step, message=""))
            if self.commands.take_save():
                self.saves += 1
            time.sleep(0.005)
        self.state.update(TrainEvent("stopped", step=step, path="/x.safetensors", message="stopped"))


def test_job_registry_keeps_the_run_and_refuses_a_second():
    jobs.clear_finished()
    cfg = build_config({"output.output_name": "first"})
    job = jobs.start(cfg, host=None, factory=StepTrainer)
    try:
        wait_until(lambda: job.snapshot()["step"] >= 1)
        # a fresh page asks the registry, not its own session: it finds the running job
        assert jobs.current() is job and job.alive
        assert job.snapshot()["status"] == "running" and job.snapshot()["output_name"] == "first"
        with pytest.raises(HostError, match="first"):
            jobs.start(build_config({"output.output_name": "second"}), host=None, factory=StepTrainer)
        job.save_now()
        wait_until(lambda: job.trainer.saves == 1)
    finally:
        job.stop()
        job.join()
    snap = job.snapshot()
    assert not job.alive and snap["status"] == "stopped" and snap["output_path"] == "/x.safetensors"
    second = jobs.start(build_config({"output.output_name": "second"}), host=None, factory=StepTrainer)
    second.stop()
    second.join()
    assert jobs.current() is second and jobs.get(job.id) is job
    jobs.clear_finished()
    assert jobs.current() is None


def test_dead_thread_without_final_event_is_not_running():
    class Crashing(StepTrainer):
        def start(self) -> threading.Thread:
            def work() -> None:
                self.state.update(TrainEvent("step", step=1, total_steps=9, loss=0.5))
            t = threading.Thread(target=work, daemon=True)
            t.start()
            return t

    job = jobs.start(build_config({}), host=None, factory=Crashing)
    job.join()
    assert job.snapshot()["status"] == "finished"
    jobs.clear_finished()


def test_the_test_sections_list_follows_step_loras_as_they_are_written(tmp_path: Path):
    """The page's poll offers each new step LoRA at once (keeping the user's choice while the run
    goes on), and picks the final LoRA when the run ends."""
    from types import SimpleNamespace

    from lora_trainer.ui.train_section import _poll

    go, finish = threading.Event(), threading.Event()

    class CheckpointingTrainer(StepTrainer):
        def run(self) -> None:
            self.state.update(TrainEvent("step", step=1, total_steps=2, loss=0.5))
            go.wait()
            (tmp_path / "mine-step000001.safetensors").write_bytes(b"step")
            self.state.update(TrainEvent("checkpoint", step=1, total_steps=2, message="checkpoint"))
            finish.wait()
            (tmp_path / "mine.safetensors").write_bytes(b"final")
            self.state.update(TrainEvent("done", step=2, total_steps=2, path=str(tmp_path / "mine.safetensors")))

    class FolderHost:
        def lora_dir(self, config: TrainConfig) -> Path:
            return tmp_path

    ctx = SimpleNamespace(host=FolderHost(), prefix="lt")
    jobs.clear_finished()
    job = jobs.start(build_config({"output.output_name": "mine"}), host=None, factory=CheckpointingTrainer)
    try:
        wait_until(lambda: job.snapshot()["step"] == 1)
        loras, seen = _loras_and_seen(_poll(ctx, None))
        assert loras["choices"] == []  # a freshly loaded page gets the folder's list
        loras, seen = _loras_and_seen(_poll(ctx, seen))
        assert "choices" not in loras  # nothing new in the folder since
        go.set()
        wait_until(lambda: job.snapshot()["checkpoints"] == 1)
        loras, seen = _loras_and_seen(_poll(ctx, seen))
        assert loras["choices"] == ["mine-step000001"] and "value" not in loras
        loras, seen = _loras_and_seen(_poll(ctx, seen))
        assert "choices" not in loras  # sent once, not on every poll
        finish.set()
        job.join()
        loras, seen = _loras_and_seen(_poll(ctx, seen))
        assert set(loras["choices"]) == {"mine", "mine-step000001"} and loras["value"] == "mine"
    finally:
        go.set()
        finish.set()
        job.join()
        jobs.clear_finished()


def _loras_and_seen(out: list[Any]) -> tuple[Any, Any]:
    """The Test list's update and the poll's memory, of _poll's outputs."""
    return out[5], out[-1]


def wait_until(cond: Any, timeout: float = 300.0) -> None:
    """Wait for ``cond``; the timeout only turns a hang into a failure."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# -- handlers -------------------------------------------------------------------------------


def test_loss_frame_raw_and_smoothed():
    frame = handlers.loss_frame([(1, 1.0), (2, 0.0), (3, 0.0)])
    raw = frame[frame.series == "raw"]["loss"].tolist()
    smooth = frame[frame.series == "smoothed"]["loss"].tolist()
    assert raw == [1.0, 0.0, 0.0]
    assert smooth[0] == pytest.approx(1.0)  # bias-corrected EMA starts at the first value
    assert 0.0 < smooth[2] < smooth[1] < 1.0


def test_loss_frames_split_for_two_plots():
    raw, smooth = handlers.loss_frames([(1, 1.0), (2, 0.0)])
    assert list(raw.columns) == ["step", "loss"] and raw["loss"].tolist() == [1.0, 0.0]
    assert smooth["step"].tolist() == [1, 2] and smooth["loss"].iloc[1] == pytest.approx(0.1 * 0 / 0.19 + 0.9 * 0.1 / 0.19)


def test_progress_html_shows_step_speed_and_eta():
    html = handlers.progress_html({"status": "running", "step": 5, "total_steps": 20, "it_per_s": 2.5,
                                   "eta_s": 125.0, "error": None})
    assert "step 5/20" in html and "2.50 it/s" in html and "ETA 2:05" in html and "width:25.0%" in html
    assert handlers.fmt_seconds(3 * 3600 + 5 * 60 + 9) == "3h 05m" and handlers.fmt_seconds(None) == "-"
    assert "idle" in handlers.progress_html(None)
    assert "&lt;b&gt;" in handlers.progress_html({"status": "error", "step": 0, "total_steps": 0, "error": "<b>"})














def test_weights_and_tags():
    assert handlers.parse_weights("0, 0.5 0.7,1") == [0.0, 0.5, 0.7, 1.0]
    with pytest.raises(DatasetError, match="weights"):
        handlers.parse_weights("0, half")
    assert handlers.lora_tag("my_lora", 0.7) == "<lora:my_lora:0.7>"


def test_render_sweep_strips_the_tag_and_labels_each_weight():
    calls = []

    class Host:
        def render(self, prompt, negative, seed, name, weights, steps, width, height):
            calls.append((prompt, name, weights))
            from PIL import Image
            return [Image.new("RGB", (width, height)) for _ in weights]

    items = handlers.render_sweep(Host(), "<lora:cats:1> a cat, sofa", "", 3, "", [0, 1], 2, 64, 64)
    assert calls == [("a cat, sofa", "cats", [0, 1])]
    assert [label for _, label in items] == ["cats @ 0", "cats @ 1"]
    with pytest.raises(DatasetError, match="LoRA"):
        handlers.render_sweep(Host(), "a cat", "", 3, "", [0], 2, 64, 64)


def test_no_render_while_a_run_holds_the_model():
    """A render pressed during training would wait, silently, until the run ends (the run holds
    the model and a WebUI's queue): it says so at once instead, and renders once the run ended."""

    class Host:
        def render(self, prompt, negative, seed, name, weights, steps, width, height):
            from PIL import Image
            return [Image.new("RGB", (width, height)) for _ in weights]

    jobs.clear_finished()
    job = jobs.start(build_config({"output.output_name": "busy"}), host=None, factory=StepTrainer)
    try:
        wait_until(lambda: job.snapshot()["step"] >= 1)
        with pytest.raises(HostError, match="training run 'busy' is using the model"):
            handlers.render_sweep(Host(), "a cat", "", 3, "cats", [0, 1], 2, 64, 64)
    finally:
        job.stop()
        job.join()
    assert len(handlers.render_sweep(Host(), "a cat", "", 3, "cats", [0, 1], 2, 64, 64)) == 2
    jobs.clear_finished()


def test_dataset_scan_and_caption_rows(tmp_path: Path):
    from lora_trainer.data.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", n=4)
    (data / "tiny.png").write_bytes((data / "demo_000.png").read_bytes()[:40])  # truncated: corrupt
    cfg = appmod.demo_defaults(data, tmp_path / "out")
    res = handlers.scan(str(data), cfg)
    assert len([g for g in res["gallery"] if "skipped" not in g[1]]) == 4
    assert any(r[0] == "tiny.png" and r[1] == "corrupt" for r in res["problems"])
    assert res["buckets"] == [["64x64", "4"]]
    rows = handlers.load_caption_rows(str(data), cfg)
    assert [r[0] for r in rows][:4] == ["demo_000.png", "demo_001.png", "demo_002.png", "demo_003.png"]
    rows[1][1] = "an edited caption, with comma"
    msg = handlers.save_caption_rows(str(data), rows[:4], cfg, "auto")
    assert "csv" in msg and "backup" in msg
    assert handlers.load_caption_rows(str(data), cfg)[1][1] == "an edited caption, with comma"
    with pytest.raises(DatasetError):
        handlers.scan(str(tmp_path / "missing"), cfg)


def test_dataset_summary_says_what_to_do(tmp_path: Path):
    """An empty folder says which files it looks for; uncaptioned images point to the Captions
    section and the trigger word, which then makes them ready."""
    from PIL import Image

    cfg = appmod.demo_defaults(tmp_path / "data", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    summary = handlers.scan(str(tmp_path / "empty"), cfg)["summary"]
    assert summary.startswith("**No images** (.jpg") and str(tmp_path / "empty") in summary
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"p{i}.png")
    summary = handlers.scan(str(folder), cfg)["summary"]
    assert summary.startswith("**0 images** ready") and "3 without a caption: caption them in the Captions" in summary
    cfg = build_config({"data.trigger_word": "sks"}, base=cfg)
    summary = handlers.scan(str(folder), cfg)["summary"]
    assert summary.startswith("**3 images** ready") and "without a caption" not in summary
    assert "enlarged" not in summary  # 64 px images at the demo's 64 px
    summary = handlers.scan(str(folder), build_config({"data.resolution": 128}, base=cfg))["summary"]
    assert summary.endswith("\n\n3 image(s) are smaller than their bucket and are enlarged (up to 2.0x), which "
                            "trains on blurred detail; use larger images, a lower data.resolution, or "
                            "data.bucket_no_upscale: true.")


def test_import_uploads_never_overwrites(tmp_path: Path):
    src = tmp_path / "a.png"
    src.write_bytes(b"x")
    dest = tmp_path / "data"
    first = handlers.import_uploads([str(src)], dest)
    second = handlers.import_uploads([str(src)], dest)
    assert first[0].name == "a.png" and second[0].name == "a_1.png"


def test_a_caption_row_for_no_image_saves_nothing(tmp_path: Path):
    """A row added to the table, or a file name edited into a typo or a path out of the folder,
    would write a caption for no image (a stray .txt file, for "../x.png" beside the folder)."""
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.ui import app as appmod

    data = make_demo_dataset(tmp_path / "data", n=2)
    (data / "metadata.csv").unlink()  # .txt files: each row writes a file of its own
    cfg = appmod.demo_defaults(data, tmp_path / "out")
    rows = handlers.load_caption_rows(str(data), cfg)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for stray in ("demo_0001.png", "../escape.png", "demo_000.txt"):
        with pytest.raises(DatasetError, match=rf"caption table: '{re.escape(stray)}' is not an image in .*Reload from disk"):
            handlers.save_caption_rows(str(data), [*rows, [stray, "a caption"]], cfg, "auto")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert "saved 2 captions as txt" in handlers.save_caption_rows(str(data), rows, cfg, "auto")


def test_normalize_rows_from_list_or_frame():
    import pandas as pd

    assert handlers.normalize_rows([["a.png", "x"], ["", ""], ["b.png", None]]) == [["a.png", "x"], ["b.png", ""]]
    frame = pd.DataFrame([["a.png", "x"]], columns=["file", "caption"])
    assert handlers.normalize_rows(frame) == [["a.png", "x"]]


# -- app arguments --------------------------------------------------------------------------


def test_app_binds_localhost_by_default(tmp_path: Path):
    args, defaults, server, auth = appmod.resolve_args(["--data", str(tmp_path / "d"), "--port", "7999"])
    assert server == "127.0.0.1" and auth is None and args.port == 7999
    assert defaults.model.base_model == "demo" and defaults.data.resolution == 64
    assert defaults.train.max_train_steps == 60 and defaults.sample.every_n_steps > 0


def test_listen_requires_auth():
    with pytest.raises(ConfigError, match="--auth"):
        appmod.resolve_args(["--listen"])
    _, _, server, auth = appmod.resolve_args(["--listen", "--auth", "alice:s3cret:x"])
    assert server == "0.0.0.0" and auth == ("alice", "s3cret:x")


@pytest.mark.parametrize("argv, match", [
    (["--auth", "alice"], "user:password"),
    (["--auth", ":pw"], "user:password"),
    (["--port", "0"], "port"),
    (["--model", "/no/such/model.safetensors"], "no such file"),
])
def test_app_argument_errors(argv: list[str], match: str):
    with pytest.raises(ConfigError, match=match):
        appmod.resolve_args(argv)




def test_app_main_reports_errors_through_the_cli():
    from lora_trainer.cli import main

    assert main(["app", "--listen"]) == 2


def test_model_path_run_uses_it(tmp_path: Path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    _, defaults, _, _ = appmod.resolve_args(["--model", str(model)])
    assert defaults.model.base_model == str(model) and defaults.data.train_data_dir == ""


def test_app_page_ids_and_classes_are_prefixed(tmp_path: Path):
    from lora_trainer.config import build_config
    from lora_trainer.hosts.standalone import StandaloneHost

    page = appmod.create_app(StandaloneHost(), tmp_path, defaults=build_config({"output.output_dir": str(tmp_path)}))
    ids = [b.elem_id for b in page.blocks.values() if getattr(b, "elem_id", None)]
    classes = [c for b in page.blocks.values() for c in (getattr(b, "elem_classes", None) or [])]
    assert len(ids) > 50 and [i for i in ids if not i.startswith("lt-")] == []
    assert [c for c in classes if not c.startswith("lt-")] == []
    assert len(ids) == len(set(ids)), "elem_ids must be unique on the page (the WebUI shares one page)"
    if __import__("importlib").util.find_spec("lora_trainer.llm.ui") is not None:
        assert "lt-app-text" in ids  # the Text LoRA section is on the page


def test_the_tab_borrows_a_given_or_the_hosts_captioner_except_for_clip():
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.context import TabContext
    from lora_trainer.ui.tab import _borrowed_captioner

    class Cap:
        def caption(self, images: list[Any]) -> list[str]:
            return ["x" for _ in images]

    own = Cap()

    class WebuiLike(StandaloneHost):
        @property
        def captioner(self) -> Cap:
            return own

    assert _borrowed_captioner(TabContext(host=WebuiLike(), prefix="lt-"), "blip") is own
    assert _borrowed_captioner(TabContext(host=WebuiLike(), prefix="lt-"), "clip") is None
    given = Cap()
    assert _borrowed_captioner(TabContext(host=WebuiLike(), prefix="lt-", captioner=given), "both") is given
    assert _borrowed_captioner(TabContext(host=StandaloneHost(), prefix="lt-"), "blip") is None


def test_auto_on_a_gpu_takes_the_estimators_fastest_fit():
    from lora_trainer.bench.estimate import choose_settings, estimate_peak_memory

    values = presets.preset_values("auto", "sd1", memory_gb=8.0)
    choice = choose_settings(8.0, "sd1", precision=values["train.mixed_precision"])
    assert (values["train.batch_size"], values["train.gradient_checkpointing"]) == (
        choice["batch_size"], choice["gradient_checkpointing"])
    est = estimate_peak_memory("sd1", values["data.resolution"], values["train.batch_size"], values["network.rank"],
                               values["train.mixed_precision"], values["train.gradient_checkpointing"])
    assert est.total_gb <= 8.0 - 1.5
    # a WebUI's loaded model is already in memory: the same free memory then allows at least as much
    resident = presets.preset_values("auto", "sd1", memory_gb=8.0, model_resident=True)
    assert resident["train.batch_size"] >= values["train.batch_size"]


def test_auto_counts_the_vae_when_every_step_encodes_its_images():
    """Random crops or color augmentation leave the latents uncached: every step encodes its
    images, so "auto" sizes the run with the VAE and its encoding in it, and says so."""
    from lora_trainer.bench.estimate import estimate_peak_memory, needed_gb
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.train_section import auto_note_for_host, preset_for_host

    host = StandaloneHost()
    cached = preset_for_host(host, "auto", "sdxl", "lora", 12.0)
    encoded = preset_for_host(host, "auto", "sdxl", "lora", 12.0, encoded=True)

    def need(v, cache):
        return needed_gb(estimate_peak_memory(
            "sdxl", v["data.resolution"], v["train.batch_size"], v["network.rank"], v["train.mixed_precision"],
            v["train.gradient_checkpointing"], cache_latents=cache,
            checkpointing_share=v["train.checkpointing_share"]))

    assert need(encoded, False) <= 12.0 - 1.5  # what it picked fits with the images encoded at every step
    assert need(cached, False) > need(cached, True)  # the VAE's part is real: the cached pick would need more
    assert (encoded["train.batch_size"], -encoded["train.checkpointing_share"] * encoded[
        "train.gradient_checkpointing"]) <= (cached["train.batch_size"], -cached["train.checkpointing_share"] * cached[
            "train.gradient_checkpointing"])
    assert "images encoded every step" in auto_note_for_host(host, "sdxl", "lora", 12.0, encoded=True)
    assert "images encoded every step" not in auto_note_for_host(host, "sdxl", "lora", 12.0)


def test_auto_sizes_the_chosen_network_type():
    """DoRA keeps a full-size weight per adapted layer: what "auto" picks for LoRA would not fit."""
    from lora_trainer.bench.estimate import estimate_peak_memory, needed_gb

    lora = presets.preset_values("auto", "sd1", memory_gb=8.0)
    dora = presets.preset_values("auto", "sd1", memory_gb=8.0, network="dora")

    def needed(values: dict, network: str) -> float:
        return needed_gb(estimate_peak_memory(
            "sd1", values["data.resolution"], values["train.batch_size"], values["network.rank"],
            values["train.mixed_precision"], values["train.gradient_checkpointing"], network=network))

    assert needed(dora, "dora") <= 8.0 - 1.5
    assert needed(lora, "dora") > 8.0 - 1.5


def test_fixed_presets_turn_checkpointing_on_for_kinds_that_build_full_weights():
    from lora_trainer.bench.estimate import estimate_peak_memory

    assert presets.preset_values("24 GB", "sdxl")["train.gradient_checkpointing"] is False
    for kind in presets.FULL_WEIGHT_KINDS:
        assert presets.preset_values("24 GB", "sdxl", network=kind)["train.gradient_checkpointing"] is True
    assert presets.preset_values("24 GB", "sdxl", network="locon")["train.gradient_checkpointing"] is False
    # why: SDXL's 24 GB preset with DoRA needs more than the card without checkpointing, and fits with it
    v = presets.preset_values("24 GB", "sdxl", network="dora")
    args = ("sdxl", v["data.resolution"], v["train.batch_size"], v["network.rank"], v["train.mixed_precision"])
    assert estimate_peak_memory(*args, False, network="dora").total_gb > 24
    assert estimate_peak_memory(*args, True, network="dora").total_gb < 24 - 1.5


def test_choosing_a_preset_sizes_the_forms_network_type():
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import PRESET_FIELDS

    blocks = build_tab(StandaloneHost())
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    apply_preset = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "apply_preset")
    at = PRESET_FIELDS.index("train.gradient_checkpointing")

    def checkpointing(network: str) -> bool:
        update = apply_preset("24 GB", "sdxl", network)[at]
        return update["value"] if isinstance(update, dict) else update.value

    assert checkpointing("lora") is False
    assert checkpointing("dora") is True


def test_choosing_auto_says_what_it_picked_for_the_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.bench.estimate import estimate_peak_memory
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.tab import build_tab
    from lora_trainer.ui.train_section import PRESET_FIELDS

    reads: list[float] = []
    monkeypatch.setattr(presets, "gpu_free_gb", lambda: reads.append(12.0) or 12.0)
    blocks = build_tab(StandaloneHost())
    fns = blocks.fns.values() if isinstance(blocks.fns, dict) else blocks.fns
    apply_preset = next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "apply_preset")
    out = apply_preset("auto", "sdxl", "lora")
    assert len(out) == len(PRESET_FIELDS) + 1 and len(reads) == 1  # the values and the note from one reading
    share = out[PRESET_FIELDS.index("train.checkpointing_share")]
    share = share["value"] if isinstance(share, dict) else share.value
    precision = presets._mixed_precision(None)  # the card's (here: none, so fp16)
    peak = estimate_peak_memory("sdxl", 1024, 1, 16, precision, True, checkpointing_share=share).total_gb
    head = (f"auto, for 12.0 GiB free: 1024 px, batch 1, gradient checkpointing of {share:.0%} of the blocks, the "
            "fastest that fits (estimated peak ")
    assert out[-1].startswith(head) and out[-1].endswith(" GiB)")
    shown = float(out[-1][len(head):-len(" GiB)")])
    assert peak <= shown < peak + 0.1  # rounded up to a tenth: the note never says less than the estimate
    assert 0 < share < 1
    assert apply_preset("8 GB", "sdxl", "lora")[-1] == "preset 8 GB applied"


def test_the_auto_note_says_when_nothing_fits_and_when_there_is_no_gpu() -> None:
    tight = presets.auto_summary("sdxl", 6.0)
    assert tight.startswith("auto, for 6.0 GiB free: 1024 px, batch 1, gradient checkpointing of every block: ")
    assert "more than is free; lower data.resolution" in tight
    assert presets.auto_summary("sd1", 24.0).startswith("auto, for 24.0 GiB free: 512 px, batch 8, no gradient "
                                                        "checkpointing, the fastest that fits")
    assert "beside the loaded model" in presets.auto_summary("sd1", 8.0, model_resident=True)
    assert presets.auto_summary("sd1", None) == "auto: no GPU found, so the CPU demo settings"


def test_a_standalone_render_refused_while_the_model_is_held_says_the_same():
    """Standalone, a render first loads the form's model under the host's lock; a lock held by a
    run refuses the render at once, with the same words as a render refused by the run check."""
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.context import TabContext
    from lora_trainer.ui.train_section import _model_for_render

    host = StandaloneHost()
    with host.lock(), pytest.raises(HostError) as refused:
        with _model_for_render(TabContext(host=host, prefix="lt-"), ()):
            raise AssertionError("rendered while the model was held")
    assert str(refused.value) == "a training run is using the model; render when it ends, or press Stop in the Train section"
    assert str(refused.value) == str(handlers.model_busy())
