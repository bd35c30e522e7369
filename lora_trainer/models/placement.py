"""Where the model's parts sit while a run caches and trains: off the accelerator when a phase
does not need them, back exactly as they were when it does.

Moves keep the parameter objects (``nn.Module.to`` swaps each tensor's data, not the tensor), so
a host's live model, its LoRA backups and the trainer's own references stay valid, and a move to
the CPU and back returns the same bits. Every move goes through :func:`move` and every "where
is it" through :func:`device_of`, the two places a test can stand in for a second device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

# Where parked and offloaded modules wait: the host's memory.
PARK = torch.device("cpu")
# ModelBundle.extras key: the device the denoiser goes to once the caches are filled, set by a
# loader that left it in the host's memory (see :func:`denoiser_placed_later`).
DENOISER_DEVICE = "denoiser_device"
_LATER: contextvars.ContextVar[bool] = contextvars.ContextVar("lora_trainer_denoiser_later", default=False)


def device_of(module: Any) -> torch.device | None:
    """The device of ``module``'s first parameter; None for no module or one without parameters."""
    first = next(module.parameters(), None) if module is not None else None
    return None if first is None else first.device


def on_accelerator(module: Any) -> bool:
    """True when ``module`` holds accelerator memory that parking it would free."""
    where = device_of(module)
    return where is not None and where.type not in ("cpu", "meta")


def move(module: Any, device: torch.device) -> None:
    module.to(device)


def release_cached(device: torch.device) -> None:
    """Hand freed blocks back to the driver, so the next phase gets large ones (CUDA's allocator
    otherwise keeps the parked model's many small blocks)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def parked(*modules: Any) -> Iterator[None]:
    """Move the modules that sit on an accelerator to the host's memory for the block, and each
    back where it was afterwards (also when the block raises): the denoiser while the VAE fills
    the latent cache and while the text encoders fill the text cache, which would otherwise set
    the run's peak memory with the whole model resident."""
    moved: list[tuple[Any, torch.device]] = []
    try:
        for module in dict.fromkeys(m for m in modules if m is not None):  # once each, in order
            home = device_of(module)
            if on_accelerator(module) and home is not None:
                moved.append((module, home))  # first: a move that fails halfway is still undone
                move(module, PARK)
        if moved:
            release_cached(moved[0][1])
        yield
    finally:
        for module, home in reversed(moved):
            move(module, home)


@contextlib.contextmanager
def denoiser_placed_later() -> Iterator[None]:
    """Loaders called inside leave the denoiser in the host's memory and record its device in
    the bundle's extras (``DENOISER_DEVICE``); the trainer puts it there once the text and
    latent caches are filled. So a card never holds the denoiser with the text encoders (Flux's
    transformer with T5-XXL) from the load on. A context, not a flag, because every family's
    loader would otherwise have to pass it down."""
    token = _LATER.set(True)
    try:
        yield
    finally:
        _LATER.reset(token)


def denoiser_target(device: torch.device) -> torch.device:
    """Where a loader puts the denoiser of a bundle for ``device`` (the host's memory inside
    :func:`denoiser_placed_later`, when ``device`` is not the CPU)."""
    return PARK if _LATER.get() and torch.device(device).type != "cpu" else torch.device(device)


def deferred_extras(device: torch.device) -> dict[str, torch.device]:
    """The bundle extras a loader adds for ``device``: where the denoiser goes later, if it does."""
    device = torch.device(device)
    return {DENOISER_DEVICE: device} if denoiser_target(device) != device else {}


def place_denoiser(bundle: Any) -> tuple[Any, torch.device] | None:
    """Move a denoiser its loader left in the host's memory to its device; returns (module,
    where it was) to move it back, or None when it already is there."""
    target = bundle.extras.get(DENOISER_DEVICE)
    where = device_of(bundle.unet)
    if target is None or where is None or where == torch.device(target):
        return None
    move(bundle.unet, torch.device(target))
    return bundle.unet, where


@contextlib.contextmanager
def denoiser_placed(bundle: Any) -> Iterator[None]:
    """:func:`place_denoiser` for the block (a test render between runs), then back."""
    moved = place_denoiser(bundle)
    try:
        yield
    finally:
        if moved is not None:
            move(*moved)
