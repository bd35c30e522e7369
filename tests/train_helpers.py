"""Shared pieces of the training tests: a tiny in-memory host and configs at resolution 64."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer.config import TrainConfig, build_config
from lora_trainer.models import placement
from lora_trainer.models.bundle import ModelBundle
from lora_trainer.train.events import TrainEvent

# Tiny models gain nothing from intra-op threads, and on a busy 2-core runner two spinning
# threads make each step many times slower than one.


def tiny_bundle(arch: str = "sd1", prediction_type: str = "epsilon", seed: int = 0) -> ModelBundle:
    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.models.tiny import build_components

    parts = build_components(arch, seed=seed, prediction_type=prediction_type)
    return bundle_from_diffusers(parts, arch, prediction_type, torch.device("cpu"), torch.float32, f"tiny-{arch}")


class TinyHost:
    """A Host over a tiny model built from config; it records what the trainer asked of it."""

    name = "tiny"
    has_txt2img = False
    captioner = None

    def __init__(self, arch: str = "sd1", prediction_type: str = "epsilon", bundle: ModelBundle | None = None) -> None:
        self.bundle = bundle or tiny_bundle(arch, prediction_type)
        self.events: list[TrainEvent] = []
        self.refreshed = 0
        self.released = 0
        self.stop_at_step: int | None = None
        self._lock = threading.Lock()

    def loaded_model(self) -> None:
        return None

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        return self.bundle

    def release_bundle(self, bundle: ModelBundle) -> None:
        self.released += 1

    def lora_dir(self, config: TrainConfig) -> Path:
        return Path(config.output.output_dir)

    def lock(self, waiting: Any = None) -> Any:
        from lora_trainer.locks import hold

        return hold(self._lock, waiting)

    def on_event(self, event: TrainEvent) -> None:
        self.events.append(event)

    def interrupted(self) -> bool:
        steps = [e.step for e in self.events if e.kind == "step"]
        return self.stop_at_step is not None and bool(steps) and steps[-1] >= self.stop_at_step

    def refresh_loras(self) -> None:
        self.refreshed += 1

    def render(self, *args: Any, **kwargs: Any) -> list[Any]:
        raise NotImplementedError("the tiny test host does not render")


def make_data(folder: Path, n: int = 4) -> Path:
    from lora_trainer.data.demo import make_demo_dataset

    return make_demo_dataset(folder, n=n)


def tiny_config(data: Path, out: Path, **values: Any) -> TrainConfig:
    base: dict[str, Any] = {
        "model.base_model": "demo", "model.device": "cpu",
        "data.train_data_dir": str(data), "data.resolution": 64, "data.enable_buckets": False,
        "data.min_image_size": 32, "network.rank": 4, "network.alpha": 2.0,
        "optim.learning_rate": 1e-3, "optim.lr_scheduler": "constant", "train.max_train_steps": 2,
        "output.output_dir": str(out), "output.output_name": "tiny", "output.tensorboard": False,
    }
    base.update(values)
    return build_config(base)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def stopped_and_resumed(data: Path, out: Path, host: Any, stop_at: int = 3, **values: Any) -> Any:
    """A run stopped after step ``stop_at`` and resumed from its checkpoint to the end: the
    resumed run's TrainResult (compare its LoRA with a straight run's)."""
    from lora_trainer.train.trainer import Trainer

    trainer: Trainer

    def stop(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == stop_at:
            trainer.stop()

    trainer = Trainer(tiny_config(data, out, **values), host=host, callbacks=[stop])
    assert trainer.run().steps == stop_at
    return Trainer(tiny_config(data, out, **values, **{"train.resume": "latest"}), host=host).run()


# -- a second device on the CPU ----------------------------------------------------------------
CARD = torch.device("cuda")


class FakeCard:
    """A second device on the CPU, where the trainer asks (``placement.device_of`` / ``move``):
    the ``on_card`` modules start on it, and every move copies each tensor into new memory
    through ``nn.Module._apply``, the path ``.to()`` takes, so parameter objects and bits are
    checked after real copies (a GPU test checks real moves)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **on_card: torch.nn.Module) -> None:
        self.place: dict[int, torch.device] = {id(m): CARD for m in on_card.values()}
        self.names: dict[int, str] = {id(m): n for n, m in on_card.items()}  # for the moves' log
        self.moves: list[tuple[str, str]] = []
        monkeypatch.setattr(placement, "device_of", self.device_of)
        monkeypatch.setattr(placement, "move", self.move)

    def name(self, **modules: torch.nn.Module) -> None:
        """Names for the moves' log of modules that start off the card."""
        self.names.update({id(m): n for n, m in modules.items()})

    def device_of(self, module: Any) -> torch.device | None:
        if module is None or next(module.parameters(), None) is None:
            return None
        return self.place.get(id(module), torch.device("cpu"))

    def move(self, module: torch.nn.Module, device: torch.device) -> None:
        with torch.no_grad():
            module._apply(torch.clone)  # new memory for every tensor, as a move between devices
        self.place[id(module)] = torch.device(device)
        self.moves.append((self.names.get(id(module), "?"), torch.device(device).type))

    def where(self, bundle: ModelBundle) -> dict[str, str]:
        parts = {"unet": bundle.unet, "vae": bundle.vae, **{p.key: p.module for p in bundle.text_encoders}}
        return {k: self.device_of(m).type for k, m in parts.items()}  # type: ignore[union-attr]


def watch_placement(card: FakeCard, bundle: ModelBundle) -> dict[str, list[dict[str, str]]]:
    """Where every part is each time a text encoder runs, the VAE encodes and the denoiser
    predicts (hooks on the bundle's own modules: for bundles built for one test)."""
    seen: dict[str, list[dict[str, str]]] = {"text": [], "latents": [], "step": []}
    for part in bundle.text_encoders:
        part.module.register_forward_pre_hook(lambda *_: seen["text"].append(card.where(bundle)))
    encode, predict = bundle.encode_images, bundle.predict

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        seen["latents"].append(card.where(bundle))
        return encode(pixels)

    def step(*args: Any) -> torch.Tensor:
        seen["step"].append(card.where(bundle))
        return predict(*args)

    bundle.encode_images, bundle.predict = encode_images, step
    return seen


def make_transparent_data(folder: Path, n: int = 4) -> Path:
    """:func:`make_data`'s images as RGBA PNGs whose transparent region differs wildly between
    them (none, the left half, all but a corner, a stripe, ...): for alpha_mask runs."""
    import numpy as np
    from PIL import Image

    data = make_data(folder, n=n)
    for i, path in enumerate(sorted(data.glob("*.png"))):
        rgb = Image.open(path).convert("RGB")
        w, h = rgb.size
        alpha = np.full((h, w), 255, dtype=np.uint8)
        kind = i % 4
        if kind == 1:
            alpha[:, : w // 2] = 0
        elif kind == 2:
            alpha[:] = 0
            alpha[: h // 4, : w // 4] = 255
        elif kind == 3:
            alpha[h // 3: 2 * h // 3, :] = 0
            alpha[:, : w // 5] = 128
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(alpha, mode="L"))
        rgba.save(path)
    return data
