"""diffusers reads our Flux.1 files: its own kohya converter (``FluxPipeline.lora_state_dict``,
``_convert_kohya_flux_lora_to_diffusers``, written for the full-size model: 3072 wide, linear1
split 3072/3072/3072/12288) gives every module the delta it was trained with."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.families import flow_lora as dit_keys

H = 3072  # the real Flux width: diffusers' converter has it built in


def _module(rank: int, out: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(rank, H, generator=g) * 0.1,
            "lora_up.weight": torch.randn(out, rank, generator=g) * 0.1, "alpha": torch.tensor(alpha)}


def _delta(m: dict[str, torch.Tensor]) -> torch.Tensor:
    down = m["lora_down.weight"]
    return m["lora_up.weight"] @ down * (m["alpha"].item() / down.shape[0])


# our module key -> the diffusers module its LoRA must land on
MODULES = {
    "lora_unet_double_blocks_0_img_attn_qkv@q": ("transformer.transformer_blocks.0.attn.to_q", _module(4, H, 2.0, 1)),
    "lora_unet_double_blocks_0_img_attn_qkv@k": ("transformer.transformer_blocks.0.attn.to_k", _module(4, H, 2.0, 2)),
    "lora_unet_double_blocks_0_img_attn_qkv@v": ("transformer.transformer_blocks.0.attn.to_v", _module(4, H, 2.0, 3)),
    "lora_unet_double_blocks_0_txt_attn_proj": ("transformer.transformer_blocks.0.attn.to_add_out", _module(4, H, 1.0, 4)),
    "lora_unet_single_blocks_1_linear1@q": ("transformer.single_transformer_blocks.1.attn.to_q", _module(8, H, 3.0, 5)),
    "lora_unet_single_blocks_1_linear1@mlp": ("transformer.single_transformer_blocks.1.proj_mlp",
                                              _module(8, 4 * H, 3.0, 6)),
    "lora_unet_final_layer_adaLN_modulation_1@ss": ("norm_out.linear", _module(4, 2 * H, 4.0, 7)),
}


@pytest.fixture(scope="module")
def converted() -> dict[str, torch.Tensor]:
    from diffusers import FluxPipeline

    flat = {f"{k}.{n}": t for k, (_, m) in MODULES.items() for n, t in m.items()}
    file = dit_keys.file_tensors("flux1", flat)
    assert not any("@" in k for k in file)
    return FluxPipeline.lora_state_dict(dict(file))


@pytest.mark.parametrize("key", list(MODULES))
def test_diffusers_gives_each_module_its_trained_delta(converted, key):
    target, m = MODULES[key]
    a, b = converted[f"{target}.lora_A.weight"], converted[f"{target}.lora_B.weight"]
    assert torch.allclose(b @ a, _delta(m), atol=1e-5)


def test_parts_that_were_not_trained_get_nothing(converted):
    for part in ("to_k", "to_v"):
        a = converted[f"transformer.single_transformer_blocks.1.attn.{part}.lora_A.weight"]
        b = converted[f"transformer.single_transformer_blocks.1.attn.{part}.lora_B.weight"]
        assert not (b @ a).any()
