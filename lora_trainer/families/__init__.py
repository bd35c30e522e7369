"""The model families, one object each, in one registry.

``get_family("sdxl")`` answers every family question (see :mod:`lora_trainer.families.base`);
``detect_*`` find the family of a diffusers folder, a single-file state dict or a LoRA file.
Adding a family = one :class:`Family` subclass in its own module, one line in ``_FAMILIES``.
The order is the detection order: the more specific key patterns first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_trainer.families.base import Family, ObjectiveSpec
from lora_trainer.families.flux import Flux1
from lora_trainer.families.sd import SD1, SD2, SDXL
from lora_trainer.families.sd3 import SD3

__all__ = ["DEFAULT_FAMILY", "Family", "ObjectiveSpec", "all_families", "detect_folder", "detect_lora",
           "detect_lora_keys", "detect_lora_metadata", "detect_state_dict", "detect_webui_model", "family_names",
           "get_family"]

_FAMILIES: tuple[Family, ...] = (Flux1(), SD3(), SDXL(), SD2(), SD1())
_BY_NAME: dict[str, Family] = {f.name: f for f in _FAMILIES}
# The family assumed when nothing says which (model.arch auto before a model is read; the demo model's).
DEFAULT_FAMILY = "sd1"


def all_families() -> tuple[Family, ...]:
    return _FAMILIES


def family_names() -> tuple[str, ...]:
    return tuple(f.name for f in _FAMILIES)


def get_family(name: str) -> Family:
    """The family called ``name`` ("sd1", "sdxl", ...); a one-line error names the known ones."""
    from lora_trainer.errors import ModelLoadError

    try:
        return _BY_NAME[name]
    except KeyError:
        raise ModelLoadError(f"model.arch {name!r} is not a model family this trainer knows; "
                             f"use auto or one of {', '.join(family_names())}") from None


def detect_state_dict(state_dict: dict[str, Any], source: str = "checkpoint") -> Family:
    """The family of an original-layout state dict; a one-line error when none matches."""
    keys = set(state_dict)
    for family in _FAMILIES:
        if family.matches_state_dict(keys, state_dict):
            return family
    from lora_trainer.families.sd_detect import detect_arch

    return get_family(detect_arch(state_dict, source))  # raises the precise Stable Diffusion error


def detect_folder(path: Path, index: dict[str, Any]) -> Family:
    """The family of a diffusers folder; a one-line error naming its pipeline when none matches."""
    for family in _FAMILIES:
        if family.matches_folder(path, index):
            return family
    from lora_trainer.errors import ModelLoadError

    cls = index.get("_class_name", "") or "(none)"
    raise ModelLoadError(f"{path}: pipeline {cls} is not a model family this trainer knows; use one of "
                         + ", ".join(f.label for f in _FAMILIES))


def detect_lora(keys: set[str], metadata: dict[str, str]) -> Family | None:
    """The family a LoRA file was made for, from its metadata or else its keys; None if unknown."""
    return detect_lora_metadata(metadata) or next((f for f in _FAMILIES if f.matches_lora(keys, metadata)), None)


def detect_lora_metadata(metadata: dict[str, str]) -> Family | None:
    """The family a LoRA file's metadata names (``ss_base_model_version``, ...); None if none."""
    return next((f for f in _FAMILIES if f.matches_lora_metadata(metadata)), None)


def detect_lora_keys(keys: set[str]) -> Family | None:
    """The family a LoRA file's module keys point to; None if they point to none."""
    return next((f for f in _FAMILIES if f.matches_lora_keys(keys)), None)


def detect_webui_model(sd_model: Any) -> Family:
    """The family of a WebUI's model object: by the flag it sets (``is_sdxl``), else by its parts."""
    for family in _FAMILIES:
        if family.webui_flag and getattr(sd_model, family.webui_flag, False):
            return family
    for family in _FAMILIES:
        if family.matches_webui_model(sd_model):
            return family
    from lora_trainer.errors import HostError

    raise HostError(f"the loaded model ({type(sd_model).__name__}) is no model family this trainer knows")
