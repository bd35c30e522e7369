"""Tiny Flux.1 / SD3.5 transformers and the loaders' key maps for them, as the loaders' code has them.

The maps are written down from ComfyUI's ``comfy/utils.py`` (``flux_to_diffusers``,
``mmdit_to_diffusers``; the same functions are vendored in Forge Neo 2.26,
``webui/modules_forge/packages/comfy/utils.py``), completed for SD3.5 medium's ``attn2`` from
diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``: diffusers module path ->
(original module path, first row, rows) for a slice of a fused layer, (original path, None, None)
for a whole layer, (original path, None, "swap") for a (shift, scale) layer. The loaders' rule for
kohya files (``model_lora_keys_unet``: ``lora_unet_`` + every ``diffusion_model.*`` weight of
their model with dots as underscores, applied to the whole weight) is then applied to these
original names, independent of the code under test.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

Slice = tuple[str, int | None, int | str | None]


def tiny_flux() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def tiny_sd3() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=12, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm="rms_norm")


def tiny_clip(seed: int = 0) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                      num_attention_heads=2, projection_dim=32, vocab_size=1000,
                                                      bos_token_id=0, eos_token_id=2))


def comfy_flux_map(n_double: int, n_single: int, hidden: int) -> dict[str, Slice]:
    """ComfyUI/Forge Neo ``flux_to_diffusers`` for weights."""
    m: dict[str, Slice] = {}
    for i in range(n_double):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, x in enumerate("qkv"):
            m[f"{d}.attn.to_{x}"] = (f"{o}.img_attn.qkv", j * hidden, hidden)
            m[f"{d}.attn.add_{x}_proj"] = (f"{o}.txt_attn.qkv", j * hidden, hidden)
        for dif, orig in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                          "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                          "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                          "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}.items():
            m[f"{d}.{dif}"] = (f"{o}.{orig}", None, None)
    for i in range(n_single):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, x in enumerate("qkv"):
            m[f"{d}.attn.to_{x}"] = (f"{o}.linear1", j * hidden, hidden)
        m[f"{d}.proj_mlp"] = (f"{o}.linear1", 3 * hidden, 4 * hidden)
        m[f"{d}.norm.linear"] = (f"{o}.modulation.lin", None, None)
        m[f"{d}.proj_out"] = (f"{o}.linear2", None, None)
    basic = {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
    m.update({k: (v, None, None) for k, v in basic.items()})
    m["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, "swap")
    return m


def comfy_mmdit_map(depth: int, hidden: int, attn2_layers: tuple[int, ...]) -> dict[str, Slice]:
    """ComfyUI ``mmdit_to_diffusers`` for weights (+ attn2 as diffusers' converter names it)."""
    m: dict[str, Slice] = {}
    for i in range(depth):
        d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        for j, x in enumerate("qkv"):
            m[f"{d}.attn.to_{x}"] = (f"{o}.x_block.attn.qkv", j * hidden, hidden)
            m[f"{d}.attn.add_{x}_proj"] = (f"{o}.context_block.attn.qkv", j * hidden, hidden)
            if i in attn2_layers:
                m[f"{d}.attn2.to_{x}"] = (f"{o}.x_block.attn2.qkv", j * hidden, hidden)
        if i in attn2_layers:
            m[f"{d}.attn2.to_out.0"] = (f"{o}.x_block.attn2.proj", None, None)
        block = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
                 "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
                 "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
                 "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
        m.update({f"{d}.{k}": (f"{o}.{v}", None, None) for k, v in block.items()})
    last = depth - 1
    m[f"transformer_blocks.{last}.norm1_context.linear"] = (f"joint_blocks.{last}.context_block.adaLN_modulation.1",
                                                            None, "swap")
    basic = {"context_embedder": "context_embedder", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
             "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
             "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
             "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear",
             "pos_embed.proj": "x_embedder.proj"}
    m.update({k: (v, None, None) for k, v in basic.items()})
    m["norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, "swap")
    return m


def _swap(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a])


def to_original(weights: dict[str, torch.Tensor], table: dict[str, Slice]) -> dict[str, torch.Tensor]:
    """diffusers weights {module path: W} -> the loader's model weights {original path: W}."""
    out: dict[str, torch.Tensor] = {}
    for dif, (orig, start, rows) in table.items():
        if dif not in weights:
            continue
        w = weights[dif]
        if start is None:
            out[orig] = _swap(w) if rows == "swap" else w.clone()
            continue
        total = max(s + r for o, s, r in table.values() if o == orig and s is not None)  # type: ignore[operator]
        full = out.setdefault(orig, w.new_zeros(total, *w.shape[1:]))
        full[start:start + rows] = w
    return out


def from_original(orig_w: dict[str, torch.Tensor], table: dict[str, Slice]) -> dict[str, torch.Tensor]:
    out = {}
    for dif, (orig, start, rows) in table.items():
        if orig not in orig_w:
            continue
        w = orig_w[orig]
        out[dif] = (_swap(w) if rows == "swap" else w) if start is None else w[start:start + rows]
    return out


def linear_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {p: m.weight.detach().clone() for p, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


