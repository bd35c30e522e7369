"""LoRA file keys of the transformer families (Flux.1, SD3.5): module path <-> file key.

The plainest naming: ``lora_unet_`` + the diffusers module path with dots as underscores for the
transformer, ``lora_te1_``/``lora_te2_``/``lora_te3_`` + the module path for the text encoders.
The loaders' own spellings (ComfyUI, Forge Neo, kohya) replace this table.
"""

from __future__ import annotations

from lora_trainer.errors import LoraFormatError

_PREFIXES = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}

# ss_base_model_version and modelspec.architecture per "<family>-<variant>".
DIT_METADATA: dict[str, dict[str, str]] = {
    "flux1-dev": {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"},
    "flux1-schnell": {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell/lora"},
    "sd3-medium": {"ss_base_model_version": "sd3",
                   "modelspec.architecture": "stable-diffusion-3.5-medium/lora"},
    "sd3-large": {"ss_base_model_version": "sd3", "modelspec.architecture": "stable-diffusion-3.5-large/lora"},
}


def dit_lora_key(family: str, root: str, path: str) -> str:
    """The file key (no tensor suffix) of module ``path`` in LoRA root ``root``."""
    if root not in _PREFIXES:
        raise LoraFormatError(f"{family}: unknown LoRA root {root!r} (expected unet, te1, te2 or te3)")
    return _PREFIXES[root] + path.replace(".", "_")


def dit_module_path(family: str, key: str) -> tuple[str, str]:
    """(root, module path with underscores) of a file key; the path's dots are not recoverable
    from this naming, so callers match it against ``dit_lora_key`` of the model's modules."""
    for root, prefix in _PREFIXES.items():
        if key.startswith(prefix):
            return root, key[len(prefix):]
    raise LoraFormatError(f"{family}: LoRA key {key!r} starts with none of {', '.join(_PREFIXES.values())}")
