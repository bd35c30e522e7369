"""BLIP captions through transformers, offline.

The model comes from a local folder (``--blip-model PATH``: what ``save_pretrained`` writes), or
from the Hugging Face cache by id, or from ``<cache>/models/<name>`` — never from the network.
A host that has its own captioner (the A1111 WebUI's BLIP interrogator) passes any object with
``caption(images) -> list[str]`` instead; see :class:`Captioner` and :class:`FunctionCaptioner`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from lora_trainer.errors import ConfigError, ModelLoadError, ModelMissingError
from lora_trainer.models.tokenizer import cache_root

log = logging.getLogger(__name__)

BLIP_ALIASES = {
    "base": "Salesforce/blip-image-captioning-base",
    "large": "Salesforce/blip-image-captioning-large",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


@runtime_checkable
class Captioner(Protocol):
    """Anything that turns a batch of RGB images into one caption each."""

    def caption(self, images: list[Image.Image]) -> list[str]: ...


class FunctionCaptioner:
    """Adapts a one-image function (e.g. a WebUI interrogator's ``generate_caption``)."""

    def __init__(self, fn: Callable[[Image.Image], str], name: str = "host captioner") -> None:
        self.fn = fn
        self.name = name

    def caption(self, images: list[Image.Image]) -> list[str]:
        return [str(self.fn(img) or "").strip() for img in images]


@dataclass
class BlipOptions:
    """How BLIP runs. Lengths count tokens, including those of ``prompt``."""

    model: str = "base"  # "base", "large", a Hugging Face id in the cache, or a local folder
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    num_beams: int = 3  # beam search width; ignored when sampling
    sample: bool = False  # nucleus sampling instead of beam search (more varied captions)
    top_p: float = 0.9
    temperature: float = 1.0
    min_length: int = 5
    max_length: int = 40
    repetition_penalty: float = 1.0
    prompt: str = ""  # text the caption must start with, e.g. "a photo of"
    fp16: bool = True  # half precision on CUDA (ignored on CPU)

    def __post_init__(self) -> None:
        if self.min_length < 0 or self.max_length < 1 or self.min_length > self.max_length:
            raise ConfigError(f"BLIP lengths: need 0 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if self.num_beams < 1:
            raise ConfigError(f"BLIP num_beams must be 1 or more, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"BLIP top_p must be in (0, 1], got {self.top_p}")


def resolve_device(device: str | None) -> str:
    import torch

    if not device or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def models_dir() -> Path:
    """Where users may put captioning models we cannot download: ``<cache>/models``."""
    return cache_root() / "models"


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def _missing_error(repo_id: str) -> ModelMissingError:
    target = models_dir() / repo_id.split("/")[-1]
    return ModelMissingError(f"BLIP weights '{repo_id}' are not on this machine: put the model folder (config.json, "
                             f"model.safetensors, preprocessor_config.json and tokenizer files from "
                             f"https://huggingface.co/{repo_id}) in {target}", "--blip-model PATH")


def resolve_blip_source(model: str) -> str:
    """A local folder to load, or a hub id to look up in the HF cache (offline)."""
    name = BLIP_ALIASES.get(model, model)
    path = Path(name).expanduser()
    # Hub ids are "org/name"; anything else (or anything that exists) is meant as a folder.
    if path.exists() or "/" not in name or name.startswith((".", "/", "~")):
        if not path.is_dir() or not _is_model_folder(path):
            raise ModelLoadError(f"{path}: no BLIP model here (needs config.json and model.safetensors "
                                 f"or pytorch_model.bin, as save_pretrained writes); fix --blip-model PATH")
        return str(path)
    ours = models_dir() / name.split("/")[-1]
    if _is_model_folder(ours):
        return str(ours)
    return name


def load_blip(options: BlipOptions | None = None) -> BlipCaptioner:
    """Load BLIP for captioning without touching the network; ModelLoadError says what is missing."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    options = options or BlipOptions()
    source = resolve_blip_source(options.model)
    device = resolve_device(options.device)
    try:
        processor = BlipProcessor.from_pretrained(source, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(source, local_files_only=True)
    except OSError as e:
        if Path(source).is_dir():
            raise ModelLoadError(f"{source}: cannot load BLIP from this folder ({str(e).splitlines()[0]}); "
                                 f"it needs the files save_pretrained writes") from None
        raise _missing_error(source) from None
    return BlipCaptioner(model, processor, options, device)


class BlipCaptioner:
    """A loaded BLIP model; :meth:`caption` runs one batch."""

    def __init__(self, model: Any, processor: Any, options: BlipOptions, device: str = "cpu") -> None:
        import torch

        self.options = options
        self.device = device
        self.dtype = torch.float16 if (options.fp16 and device.startswith("cuda")) else torch.float32
        self.processor = processor
        self.model = model.to(device=device, dtype=self.dtype).eval()

    def generate_kwargs(self) -> dict[str, Any]:
        o = self.options
        kw: dict[str, Any] = {"min_length": o.min_length, "max_length": o.max_length,
                              "repetition_penalty": o.repetition_penalty}
        if o.sample:
            kw.update(do_sample=True, top_p=o.top_p, temperature=o.temperature, num_beams=1)
        else:
            kw.update(do_sample=False, num_beams=o.num_beams)
        return kw

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        if not images:
            return []
        prompt = self.options.prompt.strip()
        texts = [prompt] * len(images) if prompt else None
        inputs = self.processor(images=images, text=texts, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self.generate_kwargs())
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]

    def unload(self) -> None:
        """Free the weights (the tab calls this when captioning is done)."""
        import torch

        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
