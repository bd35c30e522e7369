"""LyCORIS' presets (network.lycoris_preset, network_args preset=...): which layers each adapts,
in diffusers and LDM naming alike, their errors, what the file records, and kohya_ss' LyCORIS
network_args with its switches left off."""

from __future__ import annotations

import re

import pytest
from lora_fixtures import ldm_unet, make_bundle, net_cfg
from torch import nn

from lora_trainer.config import ConfigError, TrainConfig, build_config, load_config
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.metadata import network_module_args
from lora_trainer.lora.targets import PRESETS, is_spatial_conv
from lora_trainer.models.tiny import build_components

_TEXT = r"^lora_te\d?_"


def _layers(arch: str = "sd1", **kw: object) -> dict[str, nn.Module]:
    """{file key: adapted module} of a tiny ``arch`` model with network settings ``kw``."""
    bundle = make_bundle(arch)
    roots = bundle.trainable_roots()
    net = inject_lora(bundle, net_cfg(**kw))
    try:
        return {k: roots[s.root].get_submodule(s.path) for k, s in net.layout.items()}
    finally:
        net.remove()


def _unet(keys: dict[str, nn.Module]) -> set[str]:
    return {k for k in keys if k.startswith("lora_unet_")}


def _text(keys: dict[str, nn.Module]) -> set[str]:
    return {k for k in keys if re.match(_TEXT, k)}


def test_attn_mlp_is_kohyas_targets_and_attn_only_their_attention():
    kohya = _layers()
    assert set(_layers(lycoris_preset="attn-mlp")) == set(kohya)
    only = _layers(lycoris_preset="attn-only")
    assert _unet(only) == {k for k in _unet(kohya) if re.search(r"_attn[12]_", k)}
    assert _text(only) == {k for k in _text(kohya) if "_self_attn_" in k}
    assert any("_ff_net_" in k for k in kohya) and any("_mlp_fc1" in k for k in kohya)


def test_full_adds_resnets_samplers_conv_in_out_and_time_embedding_with_3x3_convs():
    kohya, full = _layers(), _layers(lycoris_preset="full", conv_rank=2)
    assert set(kohya) < set(full) and _text(full) == _text(kohya)
    for key in ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1",
                "lora_unet_time_embedding_linear_2", "lora_unet_down_blocks_0_resnets_0_conv1",
                "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
                "lora_unet_mid_block_resnets_1_time_emb_proj"):
        assert key in full, key
    assert "lora_unet_conv_in" not in _layers(type="locon")  # kohya's LoCon: not conv in/out
    unet_only = _layers(lycoris_preset="unet-only", train_text_encoder=False)
    assert set(unet_only) == _unet(full)


def test_full_lin_has_no_3x3_conv_and_convblock_only_no_transformer():
    lin = _layers(lycoris_preset="full-lin", conv_rank=8)  # conv_rank is ignored, as LyCORIS does
    assert not any(is_spatial_conv(m) for m in lin.values())
    assert "lora_unet_time_embedding_linear_1" in lin and "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in lin
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in lin and "lora_unet_conv_in" not in lin
    conv = _layers(lycoris_preset="unet-convblock-only", train_text_encoder=False)
    assert not any("_attentions_" in k for k in conv) and "lora_unet_time_embedding_linear_1" not in conv
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_down_blocks_0_downsamplers_0_conv"} <= set(conv)
    assert set(_layers(lycoris_preset="unet-transformer-only", train_text_encoder=False)) == _unet(_layers())


def _down_ranks(**kw: object) -> dict[str, int]:
    net = inject_lora(make_bundle("sd1"), net_cfg(**kw))
    try:
        sd = net.to_kohya()
    finally:
        net.remove()
    return {k: sd[f"{k}.lora_down.weight"].shape[0] for k in ("lora_unet_conv_in", "lora_unet_time_embedding_linear_1")}


def test_3x3_convs_of_a_preset_get_conv_rank_or_else_rank():
    assert _down_ranks(rank=4, lycoris_preset="full") == {"lora_unet_conv_in": 4, "lora_unet_time_embedding_linear_1": 4}
    assert _down_ranks(rank=4, conv_rank=2, lycoris_preset="full") == {"lora_unet_conv_in": 2,
                                                                       "lora_unet_time_embedding_linear_1": 4}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_a_preset_gives_the_same_keys_in_ldm_naming(arch):
    parts = build_components(arch)
    ldm = make_bundle(arch, parts, unet=ldm_unet(arch), unet_naming="ldm")
    cfg = net_cfg(lycoris_preset="full", conv_rank=2, train_text_encoder=False)
    ldm_keys = set(inject_lora(ldm, cfg).layout)
    dif_keys = set(_layers(arch, lycoris_preset="full", conv_rank=2, train_text_encoder=False))
    # The LDM test model has one transformer block everywhere (the tiny diffusers SDXL has two at
    # its deepest level).
    assert ldm_keys == {k for k in dif_keys if "transformer_blocks_1_" not in k}
    assert len(ldm_keys) > len(_layers(arch, train_text_encoder=False))


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_every_type_takes_a_preset(kind):
    keys = _layers(type=kind, lycoris_preset="attn-only", train_text_encoder=False)
    assert keys and all(re.search(r"_attn[12]_", k) for k in keys)
    full = _layers(type=kind, lycoris_preset="full", train_text_encoder=False)
    assert {"lora_unet_conv_in", "lora_unet_time_embedding_linear_1", "lora_unet_down_blocks_0_resnets_0_conv1"} <= set(full)


def test_preset_errors_name_the_field_and_what_to_do():
    with pytest.raises(ConfigError, match=r"network.lycoris_preset: unet-only adapts no text-encoder layer"):
        build_config({"network.lycoris_preset": "unet-only", "network.train_text_encoder": True})
    with pytest.raises(ConfigError, match=r"network.lycoris_preset: full and network.target_modules"):
        build_config({"network.lycoris_preset": "full", "network.target_modules": ["attn2"]})
    with pytest.raises(ConfigError, match=r"network.lycoris_preset: full: .*SD1, SD2 and SDXL UNet, not flux1"):
        build_config({"network.lycoris_preset": "full", "model.arch": "flux1"})
    with pytest.raises(ConfigError, match=r"network.lycoris_preset"):
        build_config({"network.lycoris_preset": "my_preset.toml"})


def test_preset_on_a_model_without_a_kohya_unet_is_refused_at_injection():
    from dit_fixtures import tiny_flux

    bundle = make_bundle("sd1")
    bundle.arch, bundle.unet = "flux1", tiny_flux()
    with pytest.raises(ConfigError, match=r"LyCORIS' presets are for the SD1, SD2 and SDXL UNet, not flux1"):
        inject_lora(bundle, net_cfg(lycoris_preset="attn-mlp", train_text_encoder=False))


def test_the_file_records_the_preset_and_the_conv_rank_it_used():
    _, args = network_module_args(build_config({"network.type": "loha", "network.lycoris_preset": "full"}).network)
    assert args["preset"] == "full" and args["conv_dim"] == "16"
    _, args = network_module_args(build_config({"network.lycoris_preset": "attn-only", "network.conv_rank": 4}).network)
    assert args["preset"] == "attn-only" and "conv_dim" not in args
    assert "preset" not in network_module_args(TrainConfig().network)[1]
    # kohya's block conv ranks without conv_dim: no conv_dim recorded, as kohya records none
    blocks = build_config({"network.conv_block_dims": ",".join(["4"] * 25)}).network
    assert "conv_dim" not in network_module_args(blocks)[1]


KOHYA_SS_LOHA = """
pretrained_model_name_or_path = "model.safetensors"
train_data_dir = "data"
network_module = "lycoris.kohya"
network_dim = 8
network_alpha = 4
network_args = ["preset=full", "conv_dim=4", "conv_alpha=1", "use_tucker=False", "rank_dropout=0",
                "bypass_mode=False", "dora_wd=False", "module_dropout=0", "use_tucker=False", "use_scalar=False",
                "rank_dropout_scale=False", "algo=loha", "train_norm=False"]
"""


def test_a_kohya_ss_lycoris_config_loads_with_its_switches_off(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(KOHYA_SS_LOHA)
    n = load_config(path).network
    assert (n.type, n.lycoris_preset, n.rank, n.conv_rank, n.conv_alpha) == ("loha", "full", 8, 4, 1.0)
    lokr = KOHYA_SS_LOHA.replace("algo=loha", "algo=lokr").replace(
        '"train_norm=False"]', '"train_norm=False", "factor=-1", "use_cp=False", "decompose_both=False"]')
    path.write_text(lokr)
    assert load_config(path).network.type == "lokr"


@pytest.mark.parametrize(("args", "preset"), [([], "full"), (["preset=attn-mlp"], "attn-mlp"),
                                              (["algo=lokr", "preset=unet-transformer-only"], "unet-transformer-only")])
def test_lycoris_kohya_trains_lycoris_default_preset_unless_network_args_name_one(args, preset):
    cfg = build_config_from({"network_module": "lycoris.kohya", "network_args": args})
    assert cfg.network.lycoris_preset == preset
    assert build_config_from({"network_module": "networks.lora"}).network.lycoris_preset == "kohya"


def build_config_from(data: dict) -> TrainConfig:
    from lora_trainer.config import flatten_user_dict

    return build_config(flatten_user_dict(data))


@pytest.mark.parametrize(("arg", "message"), [
    ("use_tucker=True", r"network_args: use_tucker=True: the Tucker decomposition .* \(use_tucker=False only\)"),
    ("train_norm=True", r"network_args: train_norm=True: LyCORIS' training of the norm layers"),
    ("disable_conv_cp=False", r"network_args: disable_conv_cp=False: .*\(disable_conv_cp=True only\)"),
    ("rank_dropout=0.1", r"network_args: rank_dropout_scale=False: .*set rank_dropout_scale=True"),
    ("full_matrix=True", r"network_args: full_matrix=True: .*network.rank"),
])
def test_a_lycoris_switch_turned_on_is_refused_in_one_line(tmp_path, arg, message):
    path = tmp_path / "config.toml"
    path.write_text(KOHYA_SS_LOHA.replace('"train_norm=False"]', f'"train_norm=False", "{arg}"]'))  # the last wins
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_the_field_offers_kohya_and_every_preset():
    import typing

    from lora_trainer.config import _type_of

    assert set(typing.get_args(_type_of("network.lycoris_preset"))) == {"kohya", *PRESETS}


@pytest.mark.parametrize(("arch", "unet"), [("sd1", None), ("sdxl", "ldm")])
def test_inspect_names_a_full_preset_files_layers_and_every_loader_reads_it(arch, unet):
    from lora_trainer.lora.report import analyse

    parts = build_components(arch)
    bundle = make_bundle(arch, parts, unet=ldm_unet(arch) if unet else None, unet_naming=unet or "diffusers")
    net = inject_lora(bundle, net_cfg(lycoris_preset="full", conv_rank=2))
    try:
        report = analyse(net.to_kohya(), {})
    finally:
        net.remove()
    kinds = set(report["targets"])
    assert {"conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2"} <= kinds
    assert kinds & {"time_emb_proj", "emb_layers_1"} and kinds & {"conv", "op"}
    assert not any(k.startswith("lora_") or k.isdigit() for k in kinds)
    assert not report["problems"] and all(v["ok"] for v in report["verdicts"].values()), report["verdicts"]
