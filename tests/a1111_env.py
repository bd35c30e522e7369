"""Test helper: the A1111 WebUI stand-in (tests/webui_stub) with a tiny live SD1 model.

``webui_session()`` puts the stand-in on sys.path and builds the model once; ``reset()`` gives
each test a fresh WebUI state (LoRA folder, lists, flags) around the same model object.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

STUB = Path(__file__).resolve().parent / "webui_stub"
STUB_MODULES = ("modules", "networks", "tiny_ldm", "lora_keys")


def enter() -> SimpleNamespace:
    sys.path.insert(0, str(STUB))
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]
    mods = SimpleNamespace(
        shared=importlib.import_module("modules.shared"),
        call_queue=importlib.import_module("modules.call_queue"),
        lowvram=importlib.import_module("modules.lowvram"),
        processing=importlib.import_module("modules.processing"),
        script_callbacks=importlib.import_module("modules.script_callbacks"),
        sd_models=importlib.import_module("modules.sd_models"),
        shared_state=importlib.import_module("modules.shared_state"),
        networks=importlib.import_module("networks"),
        tiny_ldm=importlib.import_module("tiny_ldm"),
    )
    return mods


def leave() -> None:
    if str(STUB) in sys.path:
        sys.path.remove(str(STUB))
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]


def reset(w: SimpleNamespace, sd_model, lora_dir: Path) -> None:
    w.shared.cmd_opts = w.shared.default_cmd_opts(str(lora_dir))
    w.shared.opts = w.shared.Options()
    w.shared.state = w.shared_state.State()
    w.shared.sd_model = sd_model
    w.shared.interrogator = None
    w.lowvram.module_in_gpu = None
    w.networks.loaded_networks.clear()
    w.networks.networks_in_memory.clear()
    w.networks.keys_failed_to_match.clear()
    w.networks.assign_network_names_to_compvis_modules(sd_model)
    w.networks.list_available_networks()
    sd_model.lowvram = False
    # The model as the WebUI has it after loading: checkpoint weights, requires_grad=True, eval.
    sd_model.reload_from_checkpoint()
    sd_model.requires_grad_(True)
    sd_model.eval()
    for m in sd_model.modules():
        for attr in ("network_weights_backup", "network_bias_backup", "network_current_names"):
            m.__dict__.pop(attr, None)

