"""SD1 LoRA file keys in diffusers naming -> the WebUI's LDM layer names.

Both A1111's Lora extension and Forge's (``unet_to_diffusers`` in its key map) resolve a kohya
SD1 key such as ``lora_unet_down_blocks_0_attentions_0_..._to_q`` to the LDM layer
``input_blocks.1.1...to_q``; the stand-ins of both use this one table (written for the tests).
"""

from __future__ import annotations

import re

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _res_suffix(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest
    return next((v + rest[len(k):] for k, v in _RESNET.items() if rest.startswith(k)), rest)


# The UNet's single layers (both WebUIs map them: A1111's regexes, Forge's UNET_MAP_BASIC).
_SINGLE = {"lora_unet_conv_in": "input_blocks_0_0", "lora_unet_conv_out": "out_2",
           "lora_unet_time_embedding_linear_1": "time_embed_0", "lora_unet_time_embedding_linear_2": "time_embed_2"}


def webui_layer_name(key: str) -> str:
    """SD1 file key (without tensor suffix) -> the layer name the WebUI looks up."""
    if key in _SINGLE:
        return f"diffusion_model_{_SINGLE[key]}"
    m = re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"
    m = re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:  # SD1's first up block has no attention
        return f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{_res_suffix(kind, rest)}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        idx = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{idx}_{_res_suffix(m[1], m[3])}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{_res_suffix(kind, rest)}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key
