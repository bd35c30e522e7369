"""Test helper: the Forge stand-in (tests/forge_stub over tests/webui_stub) with tiny engines.

``enter()`` puts the stand-in on sys.path (Forge's own files first, A1111's underneath, as Forge
ships A1111's ``modules``); ``reset()`` gives each test a fresh WebUI state around an engine
built once, with that engine selected in the checkpoint dropdown and already loaded.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parent
PATHS = (str(TESTS / "forge_stub"), str(TESTS / "webui_stub"))
STUB_MODULES = ("modules", "networks", "tiny_ldm", "lora_keys", "backend", "modules_forge", "tiny_forge")


def _forget() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in STUB_MODULES:
            del sys.modules[name]


def enter() -> SimpleNamespace:
    for p in reversed(PATHS):
        sys.path.insert(0, p)
    _forget()
    names = {"shared": "modules.shared", "shared_state": "modules.shared_state", "call_queue": "modules.call_queue",
             "processing": "modules.processing", "sd_models": "modules.sd_models",
             "script_callbacks": "modules.script_callbacks", "main_thread": "modules_forge.main_thread",
             "memory_management": "backend.memory_management", "networks": "networks", "tiny_forge": "tiny_forge"}
    return SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def leave() -> None:
    for p in PATHS:
        if p in sys.path:
            sys.path.remove(p)
    _forget()


def reset(w: SimpleNamespace, engine, lora_dir: Path) -> None:
    """Fresh shared state; ``engine`` selected, loaded and without any LoRA applied."""
    w.memory_management.unload_all_models()
    w.memory_management.events.clear()
    w.shared.cmd_opts = w.shared.default_cmd_opts(str(lora_dir))
    w.shared.opts = w.shared.Options()
    w.shared.state = w.shared_state.State()
    w.shared.interrogator = None
    w.networks.available_networks.clear()
    w.networks.reads.clear()
    w.networks.dropped.clear()
    w.networks.load_lora_state_dict.cache_clear()
    w.processing.history.clear()
    w.main_thread.thread_names.clear()
    w.sd_models.model_data = w.sd_models.SdModelData()
    if engine is not None:
        engine.forge_objects = engine.forge_objects_original.shallow_copy()
        engine.forge_objects_after_applying_lora = engine.forge_objects_original.shallow_copy()
        engine.current_lora_hash = str([])
        w.sd_models.select(engine.sd_checkpoint_info.title, lambda: engine)
        w.sd_models.forge_model_reload()
    else:
        w.shared.sd_model = w.sd_models.model_data.sd_model
