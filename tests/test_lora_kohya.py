"""kohya key tables and tensor conversion: pure functions, strict, reversible."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import ldm_unet, open_clip_text

from lora_trainer.errors import LoraFormatError
from lora_trainer.lora import kohya, targets
from lora_trainer.models.tiny import build_components


@pytest.fixture(scope="module")
def sd1_parts():
    return build_components("sd1")


@pytest.fixture(scope="module")
def sdxl_parts():
    return build_components("sdxl")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_block_table_maps_every_unet_parameter_to_the_ldm_model(arch, sd1_parts, sdxl_parts):
    """Each diffusers UNet parameter lands on an LDM parameter of the same shape (the WebUI's
    own UNet class, same topology), and the inverse brings the path back."""
    parts = sd1_parts if arch == "sd1" else sdxl_parts
    ldm_params = dict(ldm_unet(arch).named_parameters())
    checked = 0
    for name, p in parts["unet"].named_parameters():
        module, leaf = name.rsplit(".", 1)
        if arch == "sdxl" and (module.startswith("add_embedding") or ".transformer_blocks.1." in module):
            continue  # the LDM test model has no label embedding and depth 1 everywhere
        ldm = kohya.diffusers_to_ldm(module, arch)
        assert ldm_params[f"{ldm}.{leaf}"].shape == p.shape, name
        assert kohya.ldm_to_diffusers(ldm, arch) == module
        checked += 1
    assert checked > 300


@pytest.mark.parametrize("diffusers,sgm", [
    # Key pairs as found in real SDXL kohya files vs the diffusers SDXL UNet.
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("mid_block.attentions.0.transformer_blocks.9.ff.net.2", "middle_block.1.transformer_blocks.9.ff.net.2"),
    ("up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0", "output_blocks.2.1.transformer_blocks.3.attn2.to_out.0"),
    ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("add_embedding.linear_1", "label_emb.0.0"),
])
def test_sdxl_known_key_pairs(diffusers, sgm):
    assert kohya.diffusers_to_ldm(diffusers, "sdxl") == sgm
    assert kohya.ldm_to_diffusers(sgm, "sdxl") == diffusers
    assert kohya.kohya_name("sdxl", "unet", "diffusers", diffusers) == "lora_unet_" + sgm.replace(".", "_")
    assert kohya.kohya_name("sdxl", "unet", "ldm", sgm) == "lora_unet_" + sgm.replace(".", "_")


def test_sd1_names_are_diffusers_paths_in_both_namings():
    dif = "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"
    assert kohya.diffusers_to_ldm(dif, "sd1") == "output_blocks.11.1.transformer_blocks.0.attn2.to_k"
    want = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"
    assert kohya.kohya_name("sd1", "unet", "diffusers", dif) == want
    assert kohya.kohya_name("sd1", "unet", "ldm", "output_blocks.11.1.transformer_blocks.0.attn2.to_k") == want
    assert kohya.diffusers_to_ldm("up_blocks.0.upsamplers.0.conv", "sd1") == "output_blocks.2.1.conv"
    assert kohya.diffusers_to_ldm("down_blocks.2.downsamplers.0.conv", "sd1") == "input_blocks.9.0.op"


def test_unknown_unet_module_is_an_error_naming_it():
    with pytest.raises(LoraFormatError, match="down_blocks.7.attentions.0"):
        kohya.diffusers_to_ldm("down_blocks.7.attentions.0.proj_in", "sd1")
    with pytest.raises(LoraFormatError, match="input_blocks.1.1"):
        kohya.ldm_to_diffusers("input_blocks.1.1", "sdxl")  # level 0 of SDXL has no attention
    with pytest.raises(LoraFormatError, match="sd9"):
        kohya.kohya_name("sd9", "unet", "diffusers", "conv_in")


@pytest.mark.parametrize("path", ["text_model.encoder.layers.1.self_attn.q_proj", "encoder.layers.1.self_attn.q_proj",
                                  "transformer.text_model.encoder.layers.1.self_attn.q_proj"])
def test_hf_text_encoder_names_normalise_the_text_model_prefix(path):
    assert kohya.kohya_name("sd1", "te", "hf_clip", path) == "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


def test_open_clip_names_map_to_hf_names():
    path = "transformer.resblocks.3.attn"
    got = [kohya.kohya_name("sdxl", "te2", "open_clip", path, part) for part in kohya.MHA_PARTS]
    assert got == [f"lora_te2_text_model_encoder_layers_3_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
    assert kohya.kohya_name("sd2", "te", "open_clip", "transformer.resblocks.0.mlp.c_fc") == \
        "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya.kohya_name("sd2", "te", "open_clip", "model.transformer.resblocks.0.mlp.c_proj") == \
        "lora_te_text_model_encoder_layers_0_mlp_fc2"
    with pytest.raises(LoraFormatError, match="token_embedding"):
        kohya.kohya_name("sd2", "te", "open_clip", "token_embedding")


def test_default_targets_per_root(sd1_parts):
    unet = targets.default_unet_targets(sd1_parts["unet"])
    # 6 transformers in SD1's down path + 1 mid + 9 up = 16; each: proj_in/out + 10 block layers.
    assert len(unet) == 16 * 12
    assert "down_blocks.0.attentions.0.proj_in" in unet and "mid_block.attentions.0.transformer_blocks.0.ff.net.2" in unet
    te = targets.default_text_targets(sd1_parts["text_encoder"], "hf_clip")
    assert len(te) == 2 * 6
    oc = targets.default_text_targets(open_clip_text(), "open_clip")
    assert oc == [f"transformer.resblocks.{i}.{n}" for i in range(2) for n in ("attn", "mlp.c_fc", "mlp.c_proj")]
    ldm = targets.default_unet_targets(ldm_unet("sd1"))
    assert sorted(kohya.kohya_name("sd1", "unet", "ldm", p) for p in ldm) == \
        sorted(kohya.kohya_name("sd1", "unet", "diffusers", p) for p in unet)


def test_target_patterns(sd1_parts):
    roots = {"unet": (sd1_parts["unet"], "diffusers")}
    found = targets.find_targets(roots, ["attn2.to_k", "re:mid_block.*ff\\.net\\.2$"])
    assert len(found["unet"]) == 17  # to_k of 16 cross-attentions + the mid block's ff.net.2
    with pytest.raises(Exception, match="network.target_modules.*attn9"):
        targets.find_targets(roots, ["attn9.to_k"])


def _weights(rank=4, alpha=1.5, conv=False):
    g = torch.Generator().manual_seed(0)
    shape_d, shape_u = ((rank, 8, 1, 1), (16, rank, 1, 1)) if conv else ((rank, 8), (16, rank))
    return kohya.LoraWeights(torch.randn(shape_d, generator=g), torch.randn(shape_u, generator=g), alpha)


def test_tensor_round_trip_keeps_alpha_and_conv_shapes():
    w = {"lora_unet_a": _weights(), "lora_unet_b": _weights(conv=True, alpha=3.0)}
    flat = kohya.to_kohya_tensors(w, torch.float32)
    assert flat["lora_unet_a.alpha"].item() == 1.5 and flat["lora_unet_a.alpha"].dim() == 0
    assert flat["lora_unet_b.lora_down.weight"].shape == (4, 8, 1, 1)
    before = {k: v.clone() for k, v in flat.items()}
    back = kohya.from_kohya_tensors(flat)
    assert flat.keys() == before.keys() and all(torch.equal(flat[k], before[k]) for k in flat)  # not modified
    assert back["lora_unet_b"].alpha == 3.0 and back["lora_unet_b"].rank == 4
    assert torch.equal(back["lora_unet_a"].up, w["lora_unet_a"].up)


def test_strict_reader_names_the_bad_key():
    flat = kohya.to_kohya_tensors({"lora_unet_a": _weights()}, torch.float32)
    with pytest.raises(LoraFormatError, match="lora_unet_a.*alpha"):
        kohya.from_kohya_tensors({k: v for k, v in flat.items() if not k.endswith("alpha")})
    with pytest.raises(LoraFormatError, match="lora_unet_a.hada_w1"):
        kohya.from_kohya_tensors({**flat, "lora_unet_a.hada_w1": torch.zeros(1)})
    with pytest.raises(LoraFormatError, match="unet_x"):
        kohya.from_kohya_tensors({"unet_x.alpha": torch.tensor(1.0)})
    bad = dict(flat)
    bad["lora_unet_a.lora_up.weight"] = torch.zeros(16, 3)
    with pytest.raises(LoraFormatError, match="lora_unet_a"):
        kohya.from_kohya_tensors(bad)


def test_layout_rejects_two_modules_with_one_key():
    with pytest.raises(LoraFormatError, match="two modules"):
        kohya.build_layout("sd1", {"te": ("hf_clip", [("encoder.layers.0.mlp.fc1", ("",)),
                                                      ("text_model.encoder.layers.0.mlp.fc1", ("",))])})


def test_known_module_keys():
    assert kohya.known_module_key("sd1", "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0")
    assert kohya.known_module_key("sd1", "lora_unet_input_blocks_2_1_proj_in")
    assert kohya.known_module_key("sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc2")
    assert kohya.known_module_key("sd1", "lora_te1_text_model_encoder_layers_0_mlp_fc2")  # all WebUIs read te1 on SD1
    assert not kohya.known_module_key("sd2", "lora_te1_text_model_encoder_layers_0_mlp_fc2")
    assert not kohya.known_module_key("sdxl", "lora_unet_input_blocks_1_1_proj_in")  # SDXL level 0: no attention
    assert not kohya.known_module_key("sd1", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q")


def _delta(w):
    return (w.up @ w.down) * (w.alpha / w.rank)


def test_in_proj_split_and_stack_are_exact():
    g = torch.Generator().manual_seed(0)
    e, r = 8, 3
    combined = kohya.LoraWeights(torch.randn(r, e, generator=g), torch.randn(3 * e, r, generator=g), 1.5)
    parts = kohya.split_in_proj(combined)
    assert [p.rank for p in parts.values()] == [r, r, r]
    assert torch.allclose(torch.cat([_delta(parts[p]) for p in "qkv"]), _delta(combined))
    # q/k/v of different ranks and alphas, v missing: one in_proj LoRA of rank r_q + r_k.
    q = kohya.LoraWeights(torch.randn(2, e, generator=g), torch.randn(e, 2, generator=g), 0.5)
    k = kohya.LoraWeights(torch.randn(4, e, generator=g), torch.randn(e, 4, generator=g), 8.0)
    stacked = kohya.stack_qkv({"q": q, "k": k})
    assert stacked.rank == 6 and stacked.alpha == 6.0
    want = torch.cat([_delta(q), _delta(k), torch.zeros(e, e)])
    assert torch.allclose(_delta(stacked), want, atol=1e-6)
    with pytest.raises(LoraFormatError, match="multiple of 3"):
        kohya.split_in_proj(kohya.LoraWeights(torch.zeros(2, 4), torch.zeros(7, 2), 1.0))


@pytest.mark.parametrize("arch,unet_modules,te_modules", [("sd1", 192, 72), ("sd2", 192, 138), ("sdxl", 722, 192)])
def test_full_size_models_give_kohyas_module_counts(arch, unet_modules, te_modules):
    """The shipped full-size configs, built without weights: kohya's well-known module counts
    (SD1: 192 UNet + 72 TE; SDXL: 722 UNet, 192 in the bigG encoder), every key known."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import lora_trainer.models

    configs = Path(lora_trainer.models.__file__).parent / "configs" / arch
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / ("text_encoder_2" if arch == "sdxl" else "text_encoder")))
    paths = targets.default_unet_targets(unet)
    keys = [kohya.kohya_name(arch, "unet", "diffusers", p) for p in paths]
    assert len(keys) == unet_modules and all(kohya.known_module_key(arch, k) for k in keys)
    if arch == "sdxl":
        assert "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2" in keys
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v" in keys
    assert len(targets.default_text_targets(te, "hf_clip")) == te_modules


def test_alpha_is_saved_as_float32_in_half_precision_files():
    flat = kohya.to_kohya_tensors({"lora_unet_a": _weights(alpha=0.1)}, torch.float16)
    assert flat["lora_unet_a.lora_down.weight"].dtype == torch.float16
    assert flat["lora_unet_a.alpha"].dtype == torch.float32
    assert kohya.from_kohya_tensors(flat)["lora_unet_a"].alpha == float(torch.tensor(0.1, dtype=torch.float32))
