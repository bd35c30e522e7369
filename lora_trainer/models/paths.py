"""Where a base model comes from, checked without loading it (no torch needed)."""

from __future__ import annotations

from pathlib import Path

from lora_trainer.errors import ModelLoadError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # read only with model.allow_pickle


def base_model_path(base: str | None) -> Path | None:
    """None for the embedded ``demo`` model, else the path ``model.base_model`` names; ModelLoadError
    when it is empty or not there."""
    base = (base or "").strip()
    if base == "demo":
        return None
    if not base:
        raise ModelLoadError("model.base_model is empty; give a diffusers folder, a .safetensors checkpoint or 'demo'")
    path = Path(base).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model.base_model: {path} does not exist; check the path")
    return path
