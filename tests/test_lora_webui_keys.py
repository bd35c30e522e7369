"""WebUI compatibility: LDM naming gives the same file as diffusers naming, and every key
resolves to the WebUI's module by A1111's matching rule, at the trained strength.

The rule (dots -> underscores; diffusers UNet names turned into LDM names with input index =
1 + 3*block + i, middle_block_1, output index = 3*block + i, and the single layers and samplers
by name; SD2 text keys turned into open_clip names, q/k/v landing on the attention's in_proj) is
the WebUI stand-ins' table (``tests/webui_stub/lora_keys.py``), written from A1111's code,
applied to the WebUI's real LDM UNet class and an open_clip text tower.
"""

from __future__ import annotations

import re

import pytest
import torch
from lora_fixtures import ldm_unet, make_bundle, net_cfg, randomize
from torch import nn
from webui_stub.lora_keys import webui_layer_name

from lora_trainer.lora.inject import inject_lora
from lora_trainer.models.tiny import build_components


def webui_unet_name(key: str) -> str:
    """A1111: a kohya UNet key -> the LDM module name with underscores (SD1/SD2 diffusers names by
    the WebUI stand-ins' table of A1111's rules; SDXL's are LDM names already)."""
    name = webui_layer_name(key)
    return name[len("diffusion_model_"):] if name != key else key[len("lora_unet_"):]


def webui_sd2_text_name(key: str) -> tuple[str, str | None]:
    """A1111 on SD2: lora_te_ HF names -> open_clip names; q/k/v go to the attention module."""
    m = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    assert m, key
    rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
    name = f"model_transformer_resblocks_{m[1]}_{rest}"
    qkv = re.fullmatch(r"(.*)_([qkv])_proj", name)
    return (qkv[1], qkv[2]) if qkv else (name, None)


def _mapping(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {prefix + n.replace(".", "_"): m for n, m in module.named_modules() if n}


def _delta(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
    scale = sd[f"{key}.alpha"].item() / down.shape[0]
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale


def test_ldm_naming_gives_the_same_keys_as_diffusers_naming():
    ldm = make_bundle("sd1", build_components("sd1"), unet=ldm_unet("sd1"), unet_naming="ldm")
    ldm_keys = set(inject_lora(ldm, net_cfg(train_text_encoder=False)).layout)
    dif_keys = set(inject_lora(make_bundle("sd1"), net_cfg(train_text_encoder=False)).layout)
    assert ldm_keys == dif_keys and len(ldm_keys) == 192


def test_sdxl_sgm_naming_gives_the_same_keys_as_diffusers_naming():
    parts = build_components("sdxl")
    sgm = make_bundle("sdxl", parts, unet=ldm_unet("sdxl"), unet_naming="ldm")
    sgm_keys = set(inject_lora(sgm, net_cfg(train_text_encoder=False)).layout)
    dif_keys = set(inject_lora(make_bundle("sdxl", parts), net_cfg(train_text_encoder=False)).layout)
    # The LDM test model has one transformer block everywhere; the tiny diffusers SDXL has two
    # at the deepest level.
    assert sgm_keys == {k for k in dif_keys if "transformer_blocks_1_" not in k}
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in sgm_keys)


@pytest.mark.parametrize(("arch", "preset"), [("sd1", "kohya"), ("sd2", "kohya"), ("sd1", "full")])
def test_every_unet_key_resolves_in_the_webui_model_at_trained_strength(arch, preset):
    """Merge the file into a plain LDM UNet the way the WebUI does; it must equal our LoRA model
    (LyCORIS' full preset: ResNet blocks, samplers, conv in/out and time embedding too)."""
    unet = ldm_unet(arch)
    bundle = make_bundle(arch, build_components(arch), unet=unet, unet_naming="ldm")
    net = inject_lora(bundle, net_cfg(train_text_encoder=False, lycoris_preset=preset,
                                      conv_rank=2 if preset == "full" else None))
    randomize(net, std=0.05)
    sd = net.to_kohya(torch.float32)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        want = unet(x, timesteps=torch.tensor([10]), context=ctx)
    net.remove()
    mapping = _mapping(unet)
    keys = {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}
    unresolved = [k for k in keys if webui_unet_name(k) not in mapping]
    assert not unresolved
    with torch.no_grad():
        for key in keys:
            weight = mapping[webui_unet_name(key)].weight
            weight += _delta(sd, key).reshape(weight.shape)
        got = unet(x, timesteps=torch.tensor([10]), context=ctx)
    assert torch.allclose(got, want, atol=1e-5)


def test_sd2_open_clip_text_keys_resolve_in_the_webui_model_at_trained_strength():
    bundle = make_bundle("sd2", te_naming="open_clip")
    te = bundle.trainable_roots()["te"]
    net = inject_lora(bundle, net_cfg(train_unet=False))
    randomize(net, std=0.05)
    sd = net.to_kohya(torch.float32)
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = te(tokens)
    net.remove()
    mapping = _mapping(te, "model_")  # A1111 names start at the wrapped open_clip model
    keys = {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}
    assert len(keys) == 2 * 6
    with torch.no_grad():
        for key in keys:
            name, qkv = webui_sd2_text_name(key)
            assert name in mapping, key
            target = mapping[name]
            if qkv is None:
                target.weight += _delta(sd, key)
            else:
                e = target.embed_dim
                i = "qkv".index(qkv)
                target.in_proj_weight[i * e:(i + 1) * e] += _delta(sd, key)
        got = te(tokens)
    assert torch.allclose(got, want, atol=1e-5)


def test_hf_text_keys_resolve_like_the_webui_sd1_encoder():
    parts = build_components("sd1")
    net = inject_lora(make_bundle("sd1", parts), net_cfg(train_unet=False))
    # A1111 (transformers 4.x) names: transformer_text_model_encoder_layers_N_...
    names = {"transformer_text_model_" + n.replace(".", "_").removeprefix("text_model_")
             for n, _ in parts["text_encoder"].named_modules() if ".layers." in n}
    resolved = [("transformer_" + k[len("lora_te_"):]) in names for k in net.layout]
    assert resolved and all(resolved)
