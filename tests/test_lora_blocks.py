"""kohya's block weights and block ranks (networks.lora's down/mid/up_lr_weight, block_dims, ...):
which block a module is in, the weight curves, the modules, ranks and learning rates they give."""

from __future__ import annotations

import math

import pytest
from lora_fixtures import make_bundle, net_cfg

from lora_trainer.config import build_config, flatten_user_dict
from lora_trainer.errors import ConfigError
from lora_trainer.lora import blocks
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.metadata import network_module_args


def test_block_of_a_module_follows_kohyas_numbering() -> None:
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in": 1, "lora_unet_down_blocks_0_resnets_1_conv1": 2,
          "lora_unet_down_blocks_0_downsamplers_0_conv": 3, "lora_unet_down_blocks_3_resnets_1_conv2": 11,
          "lora_unet_mid_block_attentions_0_proj_out": 12, "lora_unet_up_blocks_0_resnets_0_conv1": 13,
          "lora_unet_up_blocks_1_upsamplers_0_conv": 18, "lora_unet_up_blocks_3_attentions_2_proj_out": 24,
          "lora_unet_conv_in": None, "lora_te_text_model_encoder_layers_0_mlp_fc1": None}
    assert {k: blocks.block_index("sd1", k) for k in sd} == sd
    xl = {"lora_unet_input_blocks_4_1_proj_in": 5, "lora_unet_input_blocks_8_0_conv1": 9,
          "lora_unet_middle_block_1_proj_in": 11, "lora_unet_output_blocks_0_1_proj_out": 13,
          "lora_unet_output_blocks_8_0_skip_connection": 21, "lora_unet_time_embed_0": 0, "lora_unet_out_2": 22,
          "lora_te1_text_model_encoder_layers_0_mlp_fc1": None}
    assert {k: blocks.block_index("sdxl", k) for k in xl} == xl
    assert blocks.sizes("sd2") == (12, 1, 25) and blocks.sizes("sdxl") == (9, 3, 23)


def test_weights_curves_padding_and_zero_threshold() -> None:
    sine = [math.sin(math.pi * i / 11 / 2) for i in range(12)]
    w = blocks.lr_weights("sd1", "sine+0.5", "0.3", "1,0.2", 0.25)
    assert len(w) == 25
    assert w[:12] == pytest.approx([s + 0.5 for s in sine]) and w[12] == 0.3
    assert w[13:] == [1.0, 0.0] + [1.0] * 10  # 0.2 is at most the threshold: not trained; missing ones are 1
    assert blocks.lr_weights("sd1", "cosine", "", "", 0.0)[:12] == pytest.approx(sine[::-1])
    assert blocks.lr_weights("sd1", "", "", "linear", 0.0)[13:] == pytest.approx([i / 11 for i in range(12)])
    assert blocks.lr_weights("sd1", "reverse_linear", "", "", 0.0)[:12] == pytest.approx([i / 11 for i in range(12)][::-1])
    xl = blocks.lr_weights("sdxl", "zeros+0.5", "0,1,1", "", 0.0)
    assert len(xl) == 23 and xl[0] == xl[22] == 1.0 and xl[1:10] == [0.5] * 9 and xl[10:13] == [0.0, 1.0, 1.0]
    assert blocks.lr_weights("sd1", "", "", "", 0.0) is None


@pytest.mark.parametrize("values,message", [
    ({"network.down_lr_weight": "fast"}, "network.down_lr_weight: 'fast' is neither numbers separated by commas nor "
                                         "one of cosine"),
    ({"network.mid_lr_weight": "1,a"}, "network.mid_lr_weight: '1,a' must be numbers separated by commas"),
    ({"network.block_dims": "4,4"}, "blocks (SD1 and SD2: 25, SDXL: 23), give one for each"),
    ({"network.block_alphas": ",".join(["1"] * 23), "model.arch": "sd1"}, "network.block_alphas: 23 values; sd1's UNet "
                                                                         "has 25 blocks"),
    ({"network.block_dims": ",".join(["4"] * 25), "network.init_from": "x.safetensors"},
     "network.block_dims: with network.init_from the ranks come from that file"),
    ({"network.up_lr_weight": "1,0", "model.arch": "flux1"}, "network.up_lr_weight: block weights and ranks are for "
                                                             "the SD1, SD2 and SDXL UNet"),
])
def test_bad_block_settings_are_one_line_errors(values, message) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(flatten_user_dict(values))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_kohya_network_args_set_block_settings_and_the_file_records_them() -> None:
    dims = ",".join(str(4 + i % 3) for i in range(25))
    n = build_config(flatten_user_dict({"network_module": "networks.lora", "network_args": [
        "down_lr_weight=1,0.2,1,1,0.2,1,1,0.2,1,1,1,1", "mid_lr_weight=1", "up_lr_weight=cosine+.25",
        "block_lr_zero_threshold=0.1", f"block_dims={dims}"]})).network
    assert (n.down_lr_weight, n.up_lr_weight, n.block_lr_zero_threshold, n.block_dims) == (
        "1,0.2,1,1,0.2,1,1,0.2,1,1,1,1", "cosine+.25", 0.1, dims)
    _, args = network_module_args(n)
    assert args["down_lr_weight"] == n.down_lr_weight and args["block_dims"] == dims
    assert args["block_lr_zero_threshold"] == "0.1" and "block_alphas" not in args


def _unet_keys(net) -> dict[str, int]:
    return {k: net.rank(k) for k, s in net.layout.items() if s.root == "unet"}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_block_ranks_alphas_and_zero_blocks_shape_the_network(arch) -> None:
    total = blocks.sizes(arch)[2]
    dims = [0 if b % 5 == 1 else 2 + b % 3 for b in range(total)]  # some blocks left out
    alphas = [0.5 + b for b in range(total)]
    cfg = net_cfg(type="locon", conv_rank=None, block_dims=",".join(map(str, dims)),
                  block_alphas=",".join(map(str, alphas)), conv_block_dims=",".join(["3"] * total))
    net = inject_lora(make_bundle(arch), cfg)
    plain = inject_lora(make_bundle(arch), net_cfg(type="locon"))
    seen = set()
    for key in _unet_keys(plain):
        b = blocks.block_index(arch, key)
        conv = plain.tensors(key)["lora_down.weight"].shape[-1] == 3  # a 3x3 convolution
        if b is None:
            assert key in net.layout  # outside the blocks: the network's own rank
            continue
        if not conv and dims[b] == 0:
            assert key not in net.layout, key
            continue
        seen.add(b)
        assert net.rank(key) == (3 if conv else dims[b]) and net.alpha(key) == (cfg.alpha if conv else alphas[b]), key
    assert len(seen) > 5
    te = [k for k, s in net.layout.items() if s.root != "unet"]
    assert te and all(net.rank(k) == cfg.rank for k in te)  # the text encoders are not in any block


def test_block_learning_rates_reach_the_optimizer_and_zero_blocks_are_left_out() -> None:
    cfg = net_cfg(down_lr_weight="0,0.5,0.5,0,0.5,0.5,0,0,0,0,0,0", mid_lr_weight="2", up_lr_weight="",
                  train_text_encoder=True)
    net = inject_lora(make_bundle("sd1"), cfg)
    keys = _unet_keys(net)
    # down_lr_weight's n-th value is block n's (block 0 has no module): 7, 8 and 10, 11 are at 0
    assert {blocks.block_index("sd1", k) for k in keys} == {1, 2, 4, 5, 12, *range(16, 25)}
    groups = net.param_groups(1e-3, 2e-4, up_ratio=4.0)
    lrs = {}
    for g in groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
    for key in keys:
        w = {1: 0.5, 2: 0.5, 4: 0.5, 5: 0.5, 12: 2.0}.get(blocks.block_index("sd1", key), 1.0)
        for name, p in net.tensors(key).items():
            assert lrs[id(p)] == pytest.approx(1e-3 * w * (4.0 if name.startswith("lora_up") else 1.0)), (key, name)
    te_key = next(k for k, s in net.layout.items() if s.root != "unet")
    assert all(lrs[id(p)] in (pytest.approx(2e-4), pytest.approx(8e-4)) for p in net.tensors(te_key).values())
    assert groups[0]["name"] == "unet" and groups[0]["lr_scale"] == 1.0  # the base rate comes first
    assert sum(len(g["params"]) for g in groups) == len(net.parameters())


def test_block_settings_are_refused_on_a_transformer() -> None:
    from test_lora_dit_files import _bundle

    bundle, _ = _bundle("flux1")
    with pytest.raises(ConfigError, match="block weights and ranks are for the SD1, SD2 and SDXL UNet, not flux1"):
        inject_lora(bundle, net_cfg(down_lr_weight="1,0", train_text_encoder=False))
