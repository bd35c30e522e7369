"""inspect on Flux.1 / SD3.5 files: the family (from metadata or keys), modules per block kind,
unknown keys, and the verdicts of the loaders of these families."""

from __future__ import annotations

import torch

from lora_trainer.families import flow_lora as dit_keys
from lora_trainer.lora.cli import inspect_main
from lora_trainer.lora.files import save_lora_file


def _module(key: str, rank: int, fan_in: int, out: int) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.randn(rank, fan_in), f"{key}.lora_up.weight": torch.zeros(out, rank),
            f"{key}.alpha": torch.tensor(float(rank))}


def _flux_file(extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    t: dict[str, torch.Tensor] = {}
    for i in range(2):
        t |= _module(f"lora_unet_double_blocks_{i}_img_attn_qkv", 12, 16, 48)
        t |= _module(f"lora_unet_double_blocks_{i}_txt_mlp_2", 4, 64, 16)
    t |= _module("lora_unet_single_blocks_0_linear1", 16, 16, 112)
    t |= _module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 32, 32)
    return t | (extra or {})


def test_flux_file_is_named_counted_and_ok_for_its_loaders(tmp_path, capsys):
    md = {**dit_keys.DIT_METADATA["flux1-dev"], "ss_loss_type": "huber", "ss_huber_schedule": "exponential",
          "ss_huber_c": "0.1", "ss_masked_loss": "True"}
    path = save_lora_file(tmp_path / "f.safetensors", _flux_file(), md)
    assert inspect_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture: flux1-dev" in out
    assert "  trained with: loss_type huber, huber_schedule exponential, huber_c 0.1, masked_loss" in out.splitlines()
    assert "unet double blocks    4 modules" in out and "unet single blocks    1 modules" in out
    assert "img_attn_qkv×2" in out and "linear1×1" in out
    for loader in ("ComfyUI", "Forge Neo", "diffusers", "kohya sd-scripts"):
        assert f"{loader}" in out
    assert "A1111 built-in" not in out and "PROBLEM" not in out


def test_sd3_file_found_from_keys_alone_and_unknown_keys_reported(tmp_path, capsys):
    t = _module("lora_unet_joint_blocks_0_x_block_attn_qkv", 12, 16, 48)
    t |= _module("lora_unet_joint_blocks_0_x_block_attn_to_q", 4, 16, 16)  # a diffusers name: no layer
    path = save_lora_file(tmp_path / "s.safetensors", t, {})
    assert inspect_main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "architecture: sd3 (keys: sd3" in out
    assert "1 modules match no layer of a SD3.5 model (first: lora_unet_joint_blocks_0_x_block_attn_to_q)" in out
    assert "ComfyUI              PROBLEM" in out and "Forge Neo" not in out
