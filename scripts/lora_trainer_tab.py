"""lora-trainer's entry point in A1111-style WebUIs (A1111, Forge Neo, Forge Classic): the Train
LoRA tab, its settings, its API. The host is the one for this WebUI (``host_for_this_webui``).

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

from lora_trainer.hosts.pick import host_for_this_webui  # noqa: E402
from lora_trainer.hosts.webui import WebUIHost  # noqa: E402

LT_TAB_TITLE = "Train LoRA"
LT_TAB_ID = "lt_train_lora"
LT_SECTION = ("lora_trainer", "Train LoRA")

_lt_state: dict = {}


def lt_host() -> WebUIHost:
    if "host" not in _lt_state:
        _lt_state["host"] = host_for_this_webui()
    return _lt_state["host"]


def lt_jobs():
    if "jobs" not in _lt_state:
        from lora_trainer.jobs import ApiJobs

        _lt_state["jobs"] = ApiJobs(lt_host())
    return _lt_state["jobs"]


def lt_on_ui_tabs():
    from lora_trainer.ui.tab import build_tab

    blocks = build_tab(lt_host(), remember_last_run=True, start_auto=True)
    return [(blocks, LT_TAB_TITLE, LT_TAB_ID)]


def lt_on_ui_settings() -> None:
    def add(key: str, info) -> None:
        info.section = LT_SECTION
        shared.opts.add_option(key, info)

    add("lora_trainer_output_dir", shared.OptionInfo(
        "", "Folder for trained LoRAs (empty: the WebUI's LoRA folder, --lora-dir)"))
    add("lora_trainer_preview_samples", shared.OptionInfo(
        True, "Show training samples in the WebUI's live preview"))


def lt_on_app_started(demo, app) -> None:
    from lora_trainer.hosts.webui import add_api_routes

    add_api_routes(app, lt_jobs)


script_callbacks.on_ui_tabs(lt_on_ui_tabs)
script_callbacks.on_ui_settings(lt_on_ui_settings)
script_callbacks.on_app_started(lt_on_app_started)
