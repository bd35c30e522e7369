"""lora-trainer's entry point in the A1111 WebUI: the Train LoRA tab, its settings, its API.

The WebUI executes every ``scripts/*.py`` of an extension with the extension folder on
``sys.path`` only while the file loads; the folder is appended for good here so that the
package's lazy imports keep working afterwards. Names are prefixed ``lt_``/``_lt_`` because all
extensions' scripts share one namespace.
"""

from __future__ import annotations

import os
import sys

_LT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _LT_ROOT not in sys.path:
    sys.path.append(_LT_ROOT)

from modules import script_callbacks, shared  # noqa: E402

from lora_trainer.hosts.a1111 import A1111Host  # noqa: E402

LT_TAB_TITLE = "Train LoRA"
LT_TAB_ID = "lt_train_lora"
LT_SECTION = ("lora_trainer", "Train LoRA")
LT_PRESETS = ["fast", "balanced", "quality"]

_lt_state: dict = {}


def lt_host() -> A1111Host:
    if "host" not in _lt_state:
        _lt_state["host"] = A1111Host()
    return _lt_state["host"]


def lt_jobs():
    if "jobs" not in _lt_state:
        from lora_trainer.hosts.jobs import JobManager

        _lt_state["jobs"] = JobManager(lt_host())
    return _lt_state["jobs"]


def lt_on_ui_tabs():
    from lora_trainer.ui.tab import build_tab

    blocks = build_tab(lt_host())
    return [(blocks, LT_TAB_TITLE, LT_TAB_ID)]


def lt_on_ui_settings() -> None:
    import gradio as gr

    def add(key: str, info) -> None:
        info.section = LT_SECTION
        shared.opts.add_option(key, info)

    add("lora_trainer_output_dir", shared.OptionInfo(
        "", "Folder for trained LoRAs (empty: the WebUI's LoRA folder, --lora-dir)"))
    add("lora_trainer_default_preset", shared.OptionInfo(
        "balanced", "Default training preset", gr.Radio, {"choices": LT_PRESETS}))
    add("lora_trainer_keep_checkpoints", shared.OptionInfo(
        3, "Step checkpoints to keep per run (0 keeps all)", gr.Slider, {"minimum": 0, "maximum": 20, "step": 1}))
    add("lora_trainer_preview_samples", shared.OptionInfo(
        True, "Show training samples in the WebUI's live preview"))


def lt_on_app_started(demo, app) -> None:
    from fastapi import Body, HTTPException

    from lora_trainer.errors import HostError, LoraTrainerError

    def call(fn, *args):
        try:
            return fn(*args)
        except HostError as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except LoraTrainerError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    @app.post("/lora_trainer/train")
    def lt_api_train(payload: dict = Body(...)) -> dict:
        """Start training; the body is a config (sections, dotted keys or flat aliases)."""
        return {"job_id": call(lt_jobs().start_train, payload)}

    @app.post("/lora_trainer/stop")
    def lt_api_stop(payload: dict = Body(default={})) -> dict:
        return {"stopping": lt_jobs().stop(payload.get("job_id"))}

    @app.get("/lora_trainer/status")
    def lt_api_status(job_id: str | None = None) -> dict:
        return lt_jobs().status(job_id)

    @app.post("/lora_trainer/caption")
    def lt_api_caption(payload: dict = Body(...)) -> dict:
        """Caption a folder: {"folder": ..., "model": "blip", "format": "csv", "trigger": ...}."""
        return {"job_id": call(lt_jobs().start_caption, payload)}


script_callbacks.on_ui_tabs(lt_on_ui_tabs)
script_callbacks.on_ui_settings(lt_on_ui_settings)
script_callbacks.on_app_started(lt_on_app_started)
