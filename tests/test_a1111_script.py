"""scripts/lora_trainer_tab.py against the v1.10.1 stand-in: tab, settings and API routes."""

from __future__ import annotations

import importlib.util
import runpy
import sys
import types
from pathlib import Path

import a1111_env
import pytest
import webui_api

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lora_trainer_tab.py"


@pytest.fixture
def script(webui, tmp_path: Path):
    a1111_env.reset(webui, webui.model, tmp_path / "Lora")
    webui.script_callbacks.clear_callbacks()
    ns = runpy.run_path(str(SCRIPT), run_name="lora_trainer_tab")
    webui.ns = ns
    return webui


def test_script_registers_tab_settings_and_routes(script) -> None:
    cm = script.script_callbacks.callback_map
    assert len(cm["callbacks_ui_tabs"]) == len(cm["callbacks_ui_settings"]) == len(cm["callbacks_app_started"]) == 1
    script.script_callbacks.ui_settings_callback()
    labels = script.shared.opts.data_labels
    # every setting is one the extension reads
    assert set(labels) == {"lora_trainer_output_dir", "lora_trainer_preview_samples"}
    assert all(info.section == ("lora_trainer", "Train LoRA") for info in labels.values())


def test_the_preview_setting_decides_whether_samples_reach_the_live_preview(script) -> None:
    from PIL import Image

    from lora_trainer.hosts.a1111 import A1111Host
    from lora_trainer.train.events import TrainEvent

    shown = []
    state, opts = script.shared.state, script.shared.opts
    original = state.assign_current_image
    state.assign_current_image = shown.append
    try:
        sample = TrainEvent("sample", step=2, total_steps=4, image=Image.new("RGB", (8, 8)))
        A1111Host().on_event(sample)
        opts.lora_trainer_preview_samples = False
        A1111Host().on_event(sample)
        assert shown == [sample.image]
    finally:
        state.assign_current_image = original
        opts.__dict__.pop("lora_trainer_preview_samples", None)


def test_tab_is_built_from_the_ui_package_with_the_a1111_host(script, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradio as gr

    from lora_trainer.hosts.a1111 import A1111Host

    seen = {}
    if importlib.util.find_spec("lora_trainer.ui.tab") is None:
        # The tab's contents belong to lora_trainer.ui; here only the wiring is checked.
        fake = types.ModuleType("lora_trainer.ui.tab")

        def build_tab(host, **_options):
            seen["host"] = host
            with gr.Blocks() as blocks:
                gr.Markdown("Train LoRA")
            return blocks

        fake.build_tab = build_tab
        monkeypatch.setitem(sys.modules, "lora_trainer.ui.tab", fake)
    [(blocks, title, elem_id)] = script.script_callbacks.ui_tabs_callback()
    assert isinstance(blocks, gr.Blocks) and title == "Train LoRA" and elem_id == "lt_train_lora"
    if seen:
        assert isinstance(seen["host"], A1111Host)
    else:  # the real tab: its model field names the checkpoint loaded in the WebUI
        ctx = blocks.lt_context
        assert isinstance(ctx.host, A1111Host)
        assert ctx.remember_last_run  # after a restart the page shows the last run's settings
        assert ctx.start_auto  # a first visit: the form sized for the loaded model and the card
        assert "tiny-sd1" in str(ctx.fields["model.base_model"].value)


def test_api_train_status_and_errors(script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_trainer.data.demo import make_demo_dataset

    client = webui_api.client(script.script_callbacks)
    assert client.get("/lora_trainer/status").json()["status"] == "idle"
    bad = client.post("/lora_trainer/train", json={"network": {"rnak": 4}})
    assert bad.status_code == 400 and "rnak" in bad.json()["detail"]
    data = make_demo_dataset(tmp_path / "data", n=2)
    cfg = {"data": {"train_data_dir": str(data), "resolution": 64, "enable_buckets": False, "min_image_size": 16},
           "network": {"rank": 2, "alpha": 1}, "train": {"max_train_steps": 2},
           "output": {"output_dir": "out", "output_name": "api_lora", "tensorboard": False}}
    monkeypatch.chdir(tmp_path)  # the WebUI's folder, which a relative output folder is in
    job = client.post("/lora_trainer/train", json=cfg).json()["job_id"]
    st = webui_api.wait(client, job)
    assert st["status"] == "done", st
    assert Path(st["result"]["lora_path"]).parent == Path(script.shared.cmd_opts.lora_dir)
    assert st["result"]["output_dir"] == str(tmp_path / "out")  # where its samples, logs and checkpoints are, in full
    assert st["state"]["step"] == 2 and isinstance(st["state"]["samples"], list)
    from lora_trainer import jobs as tab_jobs  # the tab shows a run started through the API

    assert tab_jobs.current().config.output.output_name == "api_lora"
    assert client.post("/lora_trainer/stop", json={}).json() == {"stopping": False}


class FakeInterrogator:
    """Stand-in for modules.interrogate.InterrogateModels (v1.10.1): load/unload/generate_caption."""

    def __init__(self) -> None:
        self.loaded = False

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def generate_caption(self, pil_image) -> str:
        assert self.loaded
        return f"a picture {pil_image.size[0]} wide"


def test_api_caption_uses_the_webui_interrogator(script, tmp_path: Path) -> None:
    from lora_trainer.caption.blip import Captioner
    from lora_trainer.data.captions import read_captions
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.hosts.a1111 import A1111Host

    assert A1111Host().captioner is None  # no interrogator: the tab falls back to its own BLIP
    script.shared.interrogator = FakeInterrogator()
    assert isinstance(A1111Host().captioner, Captioner)
    folder = make_demo_dataset(tmp_path / "cap", n=2)
    client = webui_api.client(script.script_callbacks)
    assert client.post("/lora_trainer/caption", json={}).status_code == 400
    job = client.post("/lora_trainer/caption", json={"folder": str(folder), "format": "csv"}).json()["job_id"]
    st = webui_api.wait(client, job)
    assert st["status"] == "done" and st["result"]["captions"] == 2, st
    caps = read_captions(folder, None, ".txt")
    assert all(c.startswith("a picture ") for c in caps.values()) and len(caps) == 2
    assert not script.shared.interrogator.loaded and not script.call_queue.queue_lock.locked()


class InterrogatorWithoutModel(FakeInterrogator):
    """A1111 v1.10.1's interrogator where models/BLIP holds no model and the download failed:
    its model loader swallows the error and ``load_blip_model`` indexes the empty file list."""

    def load(self) -> None:
        files: list[str] = []
        files[0]  # noqa: B018 - IndexError, as the WebUI raises it


def test_caption_names_the_missing_webui_blip_model(script, tmp_path: Path) -> None:
    """Captioning through a WebUI interrogator that cannot load BLIP ends with one line naming
    the folder and the file to put there, not "IndexError: list index out of range"."""
    from lora_trainer.data.demo import make_demo_dataset
    from lora_trainer.hosts.webui import BLIP_FILE

    paths = importlib.import_module("modules.paths")
    paths.models_path = str(tmp_path / "models")
    script.shared.interrogator = InterrogatorWithoutModel()
    folder = make_demo_dataset(tmp_path / "cap", n=2)
    before = (folder / "metadata.csv").read_bytes()
    client = webui_api.client(script.script_callbacks)
    job = client.post("/lora_trainer/caption", json={"folder": str(folder), "format": "csv"}).json()["job_id"]
    st = webui_api.wait(client, job)
    assert st["status"] == "error", st
    assert str(tmp_path / "models" / "BLIP") in st["error"] and BLIP_FILE in st["error"], st["error"]
    assert "IndexError" not in st["error"] and "\n" not in st["error"]
    assert (folder / "metadata.csv").read_bytes() == before and not script.call_queue.queue_lock.locked()

    # a model file is there, and loading fails for another reason: that reason, in one line
    (tmp_path / "models" / "BLIP").mkdir(parents=True)
    (tmp_path / "models" / "BLIP" / BLIP_FILE).write_bytes(b"not a model")

    class Broken(FakeInterrogator):
        def load(self) -> None:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")

    script.shared.interrogator = Broken()
    job = client.post("/lora_trainer/caption", json={"folder": str(folder), "format": "csv"}).json()["job_id"]
    st = webui_api.wait(client, job)
    assert st["status"] == "error" and "RuntimeError: PytorchStreamReader failed" in st["error"], st
