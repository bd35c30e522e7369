"""The Text LoRA app section: the session behind it, and its wiring by field path."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lora_trainer.llm.tiny import build_tiny_model
from lora_trainer.llm.ui import FIELDS, TextLoraSession, build_text_lora_section


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm_ui")
    data = root / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Hi {i}", "response": "Hello! How can I help?"})
                              for i in range(4)) + "\n", encoding="utf-8")
    return {"model": build_tiny_model(root / "m", "llama"), "data": data, "root": root}


def values(setup: dict[str, Path], out: str, **kw: Any) -> dict[str, Any]:
    return {"model.base_model": str(setup["model"]), "data.train_file": str(setup["data"]),
            "output.output_dir": str(setup["root"] / out), "train.epochs": 1, "train.batch_size": 2.0, **kw}


def test_session_trains_then_generates(setup: dict[str, Path]) -> None:
    s = TextLoraSession()
    assert s.generate("Hi") == "train first, or give an adapter folder"
    assert s.start(values(setup, "a")) == "started"
    last = list(s.follow(poll_s=0.05))[-1]
    assert last.startswith("done: step 2/2") and "saved adapter" in last
    adapter = setup["root"] / "a" / "text_lora"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert isinstance(s.generate("Hi 1", max_new_tokens=4, temperature=0), str)
    # The saved adapter, loaded from its folder, answers exactly like the model in memory.
    assert s.generate("Hi 1", max_new_tokens=4, temperature=0, adapter=str(adapter)) == \
        s.generate("Hi 1", max_new_tokens=4, temperature=0)


def test_session_reports_bad_settings_and_stops(setup: dict[str, Path]) -> None:
    s = TextLoraSession()
    assert s.start(values(setup, "b", **{"network.rank": 0})).startswith("error: network.rank")
    assert s.stop() == "nothing is running"
    assert s.start(values(setup, "c", **{"train.epochs": 500})) == "started"
    assert s.start(values(setup, "c")).startswith("a text-LoRA run is already going")
    s.stop()
    last = list(s.follow(poll_s=0.05))[-1]
    assert last.startswith("stopped: step") and list((setup["root"] / "c" / "checkpoints" / "text_lora").glob("step-*"))


class _Comp:
    """Records what the section asks of a gradio component (enough to check its wiring)."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        self.args, self.kw, self.handlers = args, kw, []

    def click(self, fn: Any, inputs: Any, outputs: Any) -> None:
        self.handlers.append((fn, inputs, outputs))


def test_section_wires_components_by_field_path(setup: dict[str, Path]) -> None:
    block = contextlib.nullcontext
    gr = SimpleNamespace(Column=lambda **k: block(), Row=lambda **k: block(), Markdown=_Comp, Textbox=_Comp,
                         Slider=_Comp, Number=_Comp, Button=_Comp)
    comps = build_text_lora_section(gr)
    assert all(path in comps for path in FIELDS)
    fn, inputs, outputs = comps["start"].handlers[0]
    assert inputs == [comps[p] for p in FIELDS] and outputs is comps["log"]
    ui_values = values(setup, "d", **{"network.rank": 0})
    lines = list(fn(*[ui_values.get(p, FIELDS[p][1]) for p in FIELDS]))
    assert lines == ["error: network.rank: 0 must be at least 1 (4-64 is typical)"]
