"""Which Stable Diffusion family a single-file checkpoint or a diffusers folder holds.

A WebUI-style checkpoint keeps the original LDM/SGM key layout: the family shows in which text
encoder keys it has. A diffusers folder names its pipeline class; SD1 and SD2 share one, and
their text encoders tell them apart (SD2's OpenCLIP: plain gelu, 1024 wide).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keys that identify each family in the original layout.
SD1_TE_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD2_TE_KEY = "cond_stage_model.model.token_embedding.weight"
SDXL_TE2_KEY = "conditioner.embedders.1.model.token_embedding.weight"
SDXL_TE1_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
SDXL_REFINER_TE_KEY = "conditioner.embedders.0.model.token_embedding.weight"
UNET_IN_KEY = "model.diffusion_model.input_blocks.0.0.weight"


def _load_error(message: str) -> Exception:
    from lora_trainer.errors import ModelLoadError

    return ModelLoadError(message)


def detect_arch(state_dict: dict[str, Any], source: str = "checkpoint") -> str:
    """"sd1", "sd2" or "sdxl" from the keys (and context width) of an original-layout state dict."""
    unet_in = state_dict.get(UNET_IN_KEY)
    if unet_in is None:
        raise _load_error(f"{source}: no Stable Diffusion UNet found (missing {UNET_IN_KEY}); is it a LoRA, VAE or "
                          "a diffusers-format file? Use a full SD1/SD2/SDXL checkpoint or a diffusers folder")
    if unet_in.shape[1] != 4:
        raise _load_error(f"{source}: UNet takes {unet_in.shape[1]} input channels (an inpainting or other special "
                          "model); only text-to-image checkpoints with 4 latent channels can be trained")
    if SDXL_TE2_KEY in state_dict and SDXL_TE1_KEY in state_dict:
        return "sdxl"
    if SDXL_REFINER_TE_KEY in state_dict:
        raise _load_error(f"{source}: this is an SDXL refiner; train LoRA on the SDXL base model instead")
    if SD2_TE_KEY in state_dict:
        return "sd2"
    if SD1_TE_KEY in state_dict:
        return "sd1"
    raise _load_error(f"{source}: text encoder weights not recognised (not SD1, SD2 or SDXL)")


def folder_arch(path: Path, index: dict[str, Any]) -> str | None:
    """"sd1", "sd2" or "sdxl" for a Stable Diffusion pipeline folder; None for another pipeline."""
    cls = index.get("_class_name", "")
    if cls == "StableDiffusionXLPipeline":
        return "sdxl"
    if cls != "StableDiffusionPipeline":
        return None
    try:
        unet_cfg = json.loads((path / "unet" / "config.json").read_text())
        te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        raise _load_error(f"{path}: unet/ or text_encoder/config.json is missing or unreadable") from None
    # SD2 uses OpenCLIP (plain gelu, 1024 wide); SD1 OpenAI's CLIP-L (quick_gelu, 768).
    is_sd2 = unet_cfg.get("cross_attention_dim") == 1024 or te_cfg.get("hidden_act") == "gelu"
    return "sd2" if is_sd2 else "sd1"


def sd2_prediction_type(path: Path, requested: str) -> str:
    """SD2's prediction type: the config's, a WebUI ``<name>.yaml`` beside the file, else epsilon
    (the 512 and 768-v models have identical tensors)."""
    if requested in ("epsilon", "v_prediction"):
        return requested
    yaml_path = path.with_suffix(".yaml")
    if yaml_path.is_file():
        text = yaml_path.read_text(encoding="utf-8", errors="replace")
        if re.search(r"parameterization\s*:\s*[\"']?v[\"']?\s*$", text, re.MULTILINE):
            return "v_prediction"
        return "epsilon"
    log.warning("%s: an SD2 model's prediction type cannot be read from its weights; assuming epsilon (SD2 512-base). "
                "For a 768-v model set model.prediction_type=v_prediction", path.name)
    return "epsilon"
