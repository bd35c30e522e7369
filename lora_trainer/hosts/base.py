"""The Host protocol: what the trainer and the tab need from their surroundings.

A host never knows training details; the trainer never knows which host it runs in.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.config import TrainConfig
    from lora_trainer.models.bundle import ModelBundle
    from lora_trainer.train.events import TrainEvent


@runtime_checkable
class Host(Protocol):
    name: str

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        """The model to train (loaded, or the host's live one prepared for training)."""

    def release_bundle(self, bundle: ModelBundle) -> None:
        """Undo whatever ``acquire_bundle`` changed (restore weights, devices, dtypes, flags)."""

    def lora_dir(self, config: TrainConfig) -> Path:
        """Folder the finished LoRA file goes to."""

    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Held for the whole run (the WebUI's queue lock; a plain lock standalone)."""

    def on_event(self, event: TrainEvent) -> None:
        """Progress for the host's own UI (the WebUI's progress bar); must not raise."""

    def interrupted(self) -> bool:
        """True when the host's own Interrupt was pressed."""

    def refresh_loras(self) -> None:
        """Make a newly written LoRA file usable at once."""

    def render(self, prompt: str, negative_prompt: str, seed: int, lora_name: str,
               weights: list[float], steps: int, width: int, height: int) -> list[Image.Image]:
        """One image per weight, rendering ``<lora:lora_name:w>`` with the host's pipeline."""

