"""The embedded demo model: a tiny SD1-topology model that can already draw the demo shapes.

Its weights ship with the package (``demo/demo_base.safetensors``, under 3 MB in fp16) and are
made by ``python -m lora_trainer.models.demo_pretrain``, a seeded CPU run on shapes in the eight
base colours of ``data/demo.py``. The demo dataset puts the shapes on a colour the model has
never drawn, so a LoRA trained on it changes what the model draws in a way anyone can see.

The file holds every tensor the model needs, so loading uses no random numbers: the same
weights on every machine. Of the tiny text encoder's 49408 token embeddings only the rows of the
words in the demo captions are stored (the other rows are zero).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.models import tiny

WEIGHTS_PATH = Path(__file__).parent / "demo" / "demo_base.safetensors"
RESOLUTION = 64
TOKEN_IDS, TOKEN_ROWS = "text_encoder.token_ids", "text_encoder.token_rows"
_EMBEDDING = "embeddings.token_embedding.weight"


# Norm groups of several channels: a group of one channel normalises a flat colour to zero (the
# demo images are mostly flat colour), and at 64 px the UNet's last level is 1 x 1, where a group
# of one value cannot be normalised in training mode at batch size 1.
FAMILY = "sd1"  # the demo model has SD1's topology, so its LoRAs load as SD1 LoRAs
NORM_GROUPS = 4


def unet_config() -> dict[str, Any]:
    """SD1's topology (4 levels, 2 res blocks, attention at the first three) at the smallest width."""
    return {**tiny.unet_config(FAMILY), "block_out_channels": (32, 32, 32, 32), "norm_num_groups": NORM_GROUPS}


def vae_config() -> dict[str, Any]:
    """Factor 8 like SD's; narrow at full resolution, where a VAE spends its time."""
    return {**tiny.vae_config(FAMILY), "block_out_channels": (16, 16, 32, 32), "norm_num_groups": NORM_GROUPS}


def _te_key(key: str) -> str:
    # transformers 4.x names CLIPTextModel's weights "text_model.*", 5.x does not: store without.
    return key.removeprefix("text_model.")


def pack(parts: dict[str, Any], token_ids: list[int], build_info: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (fp16) and metadata of the demo file for ``parts`` (unet, vae, text_encoder)."""
    tensors: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae"):
        for k, v in parts[name].state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().to(torch.float16).contiguous()
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    for k, v in parts["text_encoder"].state_dict().items():
        key = _te_key(k)
        if key == _EMBEDDING:
            tensors[TOKEN_IDS] = ids
            tensors[TOKEN_ROWS] = v.detach()[ids].to(torch.float16).contiguous()
        elif not key.endswith("position_ids"):
            tensors[f"text_encoder.{key}"] = v.detach().to(torch.float16).contiguous()
    metadata = {
        "unet_config": json.dumps(_public(parts["unet"].config)),
        "vae_config": json.dumps(_public(parts["vae"].config)),
        "text_config": json.dumps(tiny.text_config("quick_gelu")),
        "build": json.dumps(build_info, sort_keys=True),
    }
    return tensors, metadata


def _public(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _load_te(te: Any, tensors: dict[str, torch.Tensor]) -> None:
    own = te.state_dict()
    state = {}
    for k, v in own.items():
        key = _te_key(k)
        if key == _EMBEDDING:
            emb = torch.zeros_like(v)
            emb[tensors[TOKEN_IDS]] = tensors[TOKEN_ROWS].float()
            state[k] = emb
        elif key.endswith("position_ids"):
            state[k] = v
        else:
            state[k] = tensors[f"text_encoder.{key}"].float()
    te.load_state_dict(state)


def _build(cls: Any, config: dict[str, Any]) -> Any:
    """``cls(**config)`` without the keys an older diffusers does not take (the file is written by
    a newer one; the keys it adds keep their defaults here)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


def load_components(path: str | Path = WEIGHTS_PATH, prediction_type: str = "epsilon") -> dict[str, Any]:
    """The demo model's diffusers parts (unet, vae, text_encoder, tokenizer, scheduler), in fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.tokenizer import load_clip_tokenizer

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: the demo model's weights are missing; reinstall lora-trainer or run "
                             "'python -m lora_trainer.models.demo_pretrain' to make them")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(path))
    unet = _build(UNet2DConditionModel, json.loads(meta["unet_config"]))
    unet.load_state_dict(_prefixed(tensors, "unet."))
    vae = _build(AutoencoderKL, json.loads(meta["vae_config"]))
    vae.load_state_dict(_prefixed(tensors, "vae."))
    te = CLIPTextModel(CLIPTextConfig(**json.loads(meta["text_config"])))
    _load_te(te, tensors)
    parts: dict[str, Any] = {
        "unet": unet, "vae": vae, "text_encoder": te, "tokenizer": load_clip_tokenizer(),
        "scheduler": DDPMScheduler(**tiny.SCHEDULER_KWARGS, prediction_type=prediction_type),
    }
    for name in ("unet", "vae", "text_encoder"):
        parts[name].eval().requires_grad_(False)
    return parts
