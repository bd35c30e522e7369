"""The "Text LoRA" section of the standalone app.

:class:`TextLoraSession` holds one run (worker thread, state, last trained model) and knows no
UI toolkit; :func:`build_text_lora_section` makes the gradio components and wires them to it.
Settings travel as ``{field_path: value}`` (the same paths as the YAML), never by position.
gradio is imported by the caller and passed in: it is an optional dependency.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from lora_trainer.errors import LoraTrainerError
from lora_trainer.llm.config import LLMTrainConfig, build_llm_config
from lora_trainer.llm.train import TextLoraTrainer

# The settings the section shows: field path -> (label, default shown).
FIELDS: dict[str, tuple[str, Any]] = {
    "model.base_model": ("Base model folder", ""),
    "data.train_file": ("Training data (.jsonl or .csv)", ""),
    "output.output_dir": ("Output folder", "output/text_lora"),
    "output.output_name": ("Adapter name", "text_lora"),
    "network.rank": ("LoRA rank", 8),
    "network.alpha": ("LoRA alpha", 16),
    "train.epochs": ("Epochs", 3),
    "optim.learning_rate": ("Learning rate", 2e-4),
    "train.batch_size": ("Batch size", 4),
    "data.max_length": ("Max length (tokens)", 1024),
    "data.eval_split": ("Eval split", 0.0),
}


class TextLoraSession:
    """One text-LoRA run at a time, driven from a UI thread."""

    def __init__(self) -> None:
        self.trainer: TextLoraTrainer | None = None
        self.thread: threading.Thread | None = None
        self._gen_cache: tuple[str, Any, Any] | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, values: dict[str, Any]) -> str:
        """Start training with {field_path: value}; returns a status line (errors included)."""
        if self.running:
            return "a text-LoRA run is already going; stop it first"
        try:
            cfg: LLMTrainConfig = build_llm_config({k: v for k, v in values.items() if v is not None})
        except LoraTrainerError as e:
            return f"error: {e}"
        self.trainer = TextLoraTrainer(cfg)
        self.thread = self.trainer.start()
        return "started"

    def stop(self) -> str:
        if not self.running or self.trainer is None:
            return "nothing is running"
        self.trainer.stop()
        return "stopping after this step (a checkpoint is saved)"

    def status(self) -> str:
        """Progress line plus the run's log, as one text block."""
        if self.trainer is None:
            return "idle"
        snap = self.trainer.state.snapshot()
        head = f"{snap['status']}: step {snap['step']}/{snap['total_steps']}"
        if snap["losses"]:
            head += f", loss {snap['losses'][-1][1]:.4f}"
        if self.trainer.error is not None:
            head = f"error: {self.trainer.error}"
        return "\n".join([head, *snap["log"][-30:]])

    def follow(self, poll_s: float = 0.5) -> Iterator[str]:
        """Yield the status until the run ends (for a streaming click handler)."""
        while self.running:
            yield self.status()
            time.sleep(poll_s)
        yield self.status()

    def generate(self, prompt: str, max_new_tokens: int = 128, temperature: float = 0.7,
                 adapter: str = "") -> str:
        """Try the LoRA: the model just trained, or ``adapter`` (a folder) on its base model."""
        from lora_trainer.llm.generate import generate, load_for_generation

        if self.running:
            return "training is running; generate when it has finished or been stopped"
        try:
            if adapter.strip():
                if self._gen_cache is None or self._gen_cache[0] != adapter:
                    self._gen_cache = (adapter, *load_for_generation(None, adapter))
                _, model, tok = self._gen_cache
            elif self.trainer is not None and self.trainer.model is not None:
                model, tok = self.trainer.model.eval(), self.trainer.tokenizer
            else:
                return "train first, or give an adapter folder"
            return generate(model, tok, prompt, max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                            chat=True)
        except LoraTrainerError as e:
            return f"error: {e}"


def build_text_lora_section(gr: Any, session: TextLoraSession | None = None) -> dict[str, Any]:
    """Create the Text LoRA components inside the current gradio Blocks and wire them up.

    Returns ``{name: component}`` (field paths for settings, plus start/stop/log/prompt/...).
    """
    session = session or TextLoraSession()
    comps: dict[str, Any] = {}
    with gr.Column(elem_id="lt-llm-section"):
        gr.Markdown("Teach a language model a tone or style from chat logs (JSONL/CSV). See docs/text-lora.md.")
        with gr.Row():
            for path in ("model.base_model", "data.train_file"):
                comps[path] = gr.Textbox(label=FIELDS[path][0], value=FIELDS[path][1])
        with gr.Row():
            for path in ("output.output_dir", "output.output_name"):
                comps[path] = gr.Textbox(label=FIELDS[path][0], value=FIELDS[path][1])
        with gr.Row():
            comps["network.rank"] = gr.Slider(1, 128, value=8, step=1, label=FIELDS["network.rank"][0])
            comps["network.alpha"] = gr.Slider(1, 256, value=16, step=1, label=FIELDS["network.alpha"][0])
            comps["train.epochs"] = gr.Slider(1, 50, value=3, step=1, label=FIELDS["train.epochs"][0])
        with gr.Row():
            for path in ("optim.learning_rate", "train.batch_size", "data.max_length", "data.eval_split"):
                comps[path] = gr.Number(label=FIELDS[path][0], value=FIELDS[path][1])
        with gr.Row():
            comps["start"] = gr.Button("Start", variant="primary", elem_id="lt-llm-start")
            comps["stop"] = gr.Button("Stop", elem_id="lt-llm-stop")
        comps["log"] = gr.Textbox(label="Log", lines=10, interactive=False, elem_id="lt-llm-log")
        with gr.Row():
            comps["prompt"] = gr.Textbox(label="Try a prompt", lines=2)
            comps["adapter"] = gr.Textbox(label="Adapter folder (empty: the model just trained)")
        with gr.Row():
            comps["max_new_tokens"] = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens")
            comps["temperature"] = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature (0: greedy)")
            comps["generate"] = gr.Button("Generate", elem_id="lt-llm-generate")
        comps["output"] = gr.Textbox(label="Reply", lines=6, interactive=False, elem_id="lt-llm-output")

    paths = list(FIELDS)

    def start(*values: Any) -> Iterator[str]:
        line = session.start(dict(zip(paths, values, strict=True)))
        if line != "started":
            yield line
            return
        yield from session.follow()

    comps["start"].click(start, inputs=[comps[p] for p in paths], outputs=comps["log"])
    comps["stop"].click(session.stop, inputs=None, outputs=comps["log"])
    comps["generate"].click(session.generate, inputs=[comps["prompt"], comps["max_new_tokens"],
                                                      comps["temperature"], comps["adapter"]],
                            outputs=comps["output"])
    comps["session"] = session
    return comps
