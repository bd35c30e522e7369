"""The Host protocol: everything the trainer and the tab may ask of their surroundings.

A host never knows training details; the trainer and the tab never know which host they run
in: they ask the host, never test its name. Every host (``StandaloneHost``, ``A1111Host``,
``ForgeHost``) implements the whole protocol.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from lora_trainer.errors import HostError
from lora_trainer.families import Family, all_families
from lora_trainer.locks import Waiting

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.caption.blip import Captioner
    from lora_trainer.config import TrainConfig
    from lora_trainer.models.bundle import ModelBundle
    from lora_trainer.train.events import TrainEvent


# The dtypes a WebUI's UNet is stored or computes in, by the names configs and presets use.
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def trainable_families() -> tuple[Family, ...]:
    """The families whose loaded model a WebUI host trains in place."""
    return tuple(f for f in all_families() if f.webui_trainable)


def trainable_labels(joiner: str = "and") -> str:
    """"SD1, SD2 and SDXL": the short names of :func:`trainable_families`, for messages."""
    labels = sorted(f.a1111_version_label or f.label for f in trainable_families())
    return f"{', '.join(labels[:-1])} {joiner} {labels[-1]}" if len(labels) > 1 else "".join(labels)


@dataclass(frozen=True)
class LoadedModel:
    """The model a host has loaded and would train: a WebUI's checkpoint.

    ``family`` is a family name ("sd1", "sdxl", ...) when it can be trained; ``unsupported`` says in words a
    user acts on why it cannot ("the loaded model is Flux; ..."). Both None: not known until the
    WebUI loads the selected checkpoint (Forge loads it on first use; ``acquire_bundle`` does).
    ``resident``: trained in place, so its weights already sit in the memory the run uses.
    ``weights_cast``: (storage, computation) dtype names ("bf16", "fp32") when the host stores the
    UNet's weights narrower than it computes and casts them in every layer at every call (Forge);
    the memory estimate counts the cast copies a backward pass keeps. ``compute_dtype``: the dtype
    name the UNet computes in ("fp16", "bf16", "fp32"); the presets train in it (fp16/bf16
    autocast, or none for fp32), so autocast never casts the frozen weights (and autograd never
    keeps those casts: the UNet once more).
    """

    label: str
    family: str | None
    unsupported: str | None = None
    resident: bool = True
    weights_cast: tuple[str, str] | None = None
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.family is not None and self.unsupported is not None:
            raise ValueError("LoadedModel has a trainable family or a reason it is unsupported, not both")
        names = tuple(f.name for f in trainable_families())
        if self.family is not None and self.family not in names:
            raise ValueError(f"family {self.family!r} is not one of {names}")

    @classmethod
    def untrainable(cls, label: str, what: str) -> LoadedModel:
        """A loaded model of a family we cannot train yet (``what``: "Flux", "SD3", ...)."""
        return cls(label, None, f"the loaded model is {what}; lora-trainer trains {trainable_labels()} "
                                "checkpoints: load one of those in the checkpoint dropdown to train")

    def require_trainable(self) -> str | None:
        """The family (None while not known yet), or HostError with one line saying what to do."""
        if self.unsupported is not None:
            raise HostError(self.unsupported)
        return self.family


@runtime_checkable
class Host(Protocol):
    name: str  # for logs and metadata only: behaviour is asked of the host, never keyed on this
    has_txt2img: bool  # a txt2img tab exists that a ``<lora:name:w>`` tag can be sent to

    def loaded_model(self) -> LoadedModel | None:
        """The host's own loaded model, which a run trains; None when the run's config names
        the model to load (standalone: the form's base model is used)."""

    @property
    def captioner(self) -> Captioner | None:
        """The host's own captioner (a WebUI's BLIP interrogator), or None to load our BLIP."""

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        """The model to train (loaded, or the host's live one prepared for training)."""

    def release_bundle(self, bundle: ModelBundle) -> None:
        """Undo whatever ``acquire_bundle`` changed (restore weights, devices, dtypes, flags)."""

    def lora_dir(self, config: TrainConfig) -> Path:
        """Folder the finished LoRA file goes to."""

    def lock(self, waiting: Waiting | None = None) -> contextlib.AbstractContextManager[Any]:
        """Held for the whole run (the WebUI's queue lock; a plain lock standalone). While another
        job holds it, ``waiting()`` is called at once and then a few times a second: False gives
        up with ``WaitCancelled`` (see ``lora_trainer.locks.hold``)."""

    def on_event(self, event: TrainEvent) -> None:
        """Progress for the host's own UI (the WebUI's progress bar); must not raise."""

    def interrupted(self) -> bool:
        """True when the host's own Interrupt was pressed."""

    def refresh_loras(self) -> None:
        """Make a newly written (or re-written) LoRA file usable at once."""

    def render(self, prompt: str, negative_prompt: str, seed: int, lora_name: str,
               weights: list[float], steps: int, width: int, height: int) -> list[Image.Image]:
        """One image per weight, rendering ``<lora:lora_name:w>`` with the host's pipeline."""
