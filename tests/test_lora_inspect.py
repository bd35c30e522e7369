"""inspect: what A1111 v1.10.1, Forge and ComfyUI really do with a file (names, kinds, shapes)."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg, randomize

from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.report import analyse, format_report

SD1 = {"ss_base_model_version": "sd_v1"}
WEBUIS = ("A1111 built-in Lora", "Forge", "ComfyUI")


def _file(typ: str = "lora", **kw: object) -> dict[str, torch.Tensor]:
    net = inject_lora(make_bundle("sd1"), net_cfg(type=typ, **kw))
    randomize(net)
    return net.to_kohya(torch.float32)


def _swap(sd: dict[str, torch.Tensor], a: str, b: str) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for suffix in ("lora_down.weight", "lora_up.weight"):
        out[f"{a}.{suffix}"], out[f"{b}.{suffix}"] = sd[f"{b}.{suffix}"], sd[f"{a}.{suffix}"]
    return out


def test_sd1_text_encoder_as_lora_te1_is_fine_for_every_webui():
    sd = {k.replace("lora_te_", "lora_te1_"): v for k, v in _file().items()}
    for md in (SD1, {}):
        r = analyse(sd, md)
        assert r["architecture"] == "sd1" and r["layout"] == "tiny"
        assert all(r["verdicts"][loader]["ok"] for loader in WEBUIS), r["verdicts"]


def test_our_file_fits_the_tiny_layout_and_is_ok_everywhere():
    r = analyse(_file(), SD1)
    assert r["layout"] == "tiny" and r["kinds"] == {"lora": 204} and not r["problems"]
    assert all(v["ok"] for v in r["verdicts"].values())


def test_forge_drops_the_whole_lora_above_twelve_unmatched_keys():
    good = _file()
    extra = {f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q{i}.{s}": torch.zeros(1, 1)
             for i in range(5) for s in ("lora_down.weight", "lora_up.weight")}
    four = {k: v for k, v in extra.items() if not k.split(".")[0].endswith("4")}
    four.update({k.replace("lora_down.weight", "alpha"): torch.tensor(1.0) for k in four if "lora_down" in k})
    r = analyse({**good, **four}, SD1)  # 4 modules x 3 keys = 12: still loaded, those left out
    assert "12 keys match no layer" in r["verdicts"]["Forge"]["issues"][0]
    five = dict(four)
    five.update({k: v for k, v in extra.items() if k.split(".")[0].endswith("4")})  # +2 keys: 14
    r = analyse({**good, **five}, SD1)
    forge = " ".join(r["verdicts"]["Forge"]["issues"])
    assert "loads NOTHING of this file: 14 keys" in forge and "skipped" not in forge
    assert "left out" in " ".join(r["verdicts"]["A1111 built-in Lora"]["issues"])
    assert "14 keys are not loaded" in " ".join(r["verdicts"]["ComfyUI"]["issues"])


def test_swapped_q_and_k_are_caught_by_shape():
    sd = _file()
    blk = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2"  # 64 wide; context 32
    r = analyse(_swap(sd, f"{blk}_to_q", f"{blk}_to_k"), SD1)
    assert any("do not fit" in p and blk in p for p in r["problems"]), r["problems"]
    assert not any(r["verdicts"][loader]["ok"] for loader in WEBUIS)
    assert "do not fit" in format_report("x.safetensors", r)


def test_swapped_conv1_and_conv2_are_caught_by_shape():
    sd = _file("locon", conv_rank=2, conv_alpha=1.0, train_text_encoder=False)
    res = "lora_unet_down_blocks_1_resnets_0"  # 32 -> 64 channels: conv1 (64, 32, 3, 3), conv2 (64, 64, 3, 3)
    r = analyse(_swap(sd, f"{res}_conv1", f"{res}_conv2"), SD1)
    assert sum("do not fit" in p for p in r["problems"]) == 1 and not r["verdicts"]["ComfyUI"]["ok"]


def test_full_size_layout_shape_check():
    g = torch.Generator().manual_seed(0)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"  # 320 -> 320
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # 768 -> 320
    sd = {f"{q}.lora_down.weight": torch.randn(4, 320, generator=g), f"{q}.lora_up.weight": torch.zeros(320, 4),
          f"{q}.alpha": torch.tensor(2.0), f"{k}.lora_down.weight": torch.randn(4, 768, generator=g),
          f"{k}.lora_up.weight": torch.zeros(320, 4), f"{k}.alpha": torch.tensor(2.0)}
    r = analyse(sd, SD1)
    assert r["layout"] == "full" and not r["problems"]
    r = analyse(_swap(sd, q, k), SD1)
    assert r["layout"] == "full" and sum("do not fit" in p for p in r["problems"]) == 1


@pytest.mark.parametrize("typ", ["locon", "dora", "loha", "lokr"])
def test_our_variants_load_in_every_webui_and_not_in_diffusers(typ):
    r = analyse(_file(typ, conv_rank=2), SD1)
    assert not r["problems"] and r["layout"] == "tiny"
    assert all(r["verdicts"][loader]["ok"] for loader in WEBUIS), r["verdicts"]
    assert r["verdicts"]["diffusers"]["ok"] == (typ == "locon")
    assert list(r["kinds"]) == [{"dora": "dora+lora", "locon": "lora"}.get(typ, typ)]


def test_per_output_dora_scale_is_misread_by_a1111_and_approximate_elsewhere():
    sd = _file("dora", train_text_encoder=False)
    out_axis = {}
    for k, v in sd.items():
        if k.endswith(".dora_scale"):
            rows = sd[k.replace("dora_scale", "lora_up.weight")].shape[0]
            v = torch.ones(rows, *[1] * (v.dim() - 1))
        out_axis[k] = v
    r = analyse(out_axis, SD1)
    assert "wrong weights" in " ".join(r["verdicts"]["A1111 built-in Lora"]["issues"])
    assert "approximate" in " ".join(r["verdicts"]["ComfyUI"]["issues"])
    assert "approximate" in " ".join(r["verdicts"]["Forge"]["issues"])


def test_oft_loads_in_a1111_and_comfyui_but_forge_drops_it():
    sd = _file(train_text_encoder=False)
    modules = sorted({k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")})[:13]
    oft = {}
    for m in modules:
        oft[f"{m}.oft_blocks"] = torch.zeros(4, 8, 8)
        oft[f"{m}.alpha"] = torch.tensor(1e-3)
    r = analyse(oft, SD1)
    assert r["verdicts"]["A1111 built-in Lora"]["ok"] and r["verdicts"]["ComfyUI"]["ok"]
    assert "loads NOTHING of this file: 13 keys" in r["verdicts"]["Forge"]["issues"][0]
    assert r["kinds"] == {"oft": 13} and not r["verdicts"]["diffusers"]["ok"]


def test_a_lora_of_the_demo_model_fits_its_layout_and_is_ok_everywhere(tmp_path):
    """The demo's own LoRA (what a newcomer inspects first): its shapes are the demo model's, not
    the tiny test model's, so every loader is OK and the report says which layout it fits."""
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.lora.files import read_lora_file
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import make_data, tiny_config

    data = make_data(tmp_path / "data", n=2)
    result = Trainer(tiny_config(data, tmp_path / "out", **{"train.max_train_steps": 1}), StandaloneHost()).run()
    tensors, md = read_lora_file(result.lora_path)
    r = analyse(tensors, md)
    assert r["layout"] == "demo" and not r["problems"], r["problems"]
    assert all(v["ok"] for v in r["verdicts"].values()), r["verdicts"]
    assert "shapes fit the demo model's sd1 layout" in format_report("demo.safetensors", r)


def test_the_report_says_which_training_options_were_on():
    md = {**SD1, "ss_noise_offset": "0.05", "ss_ip_noise_gamma": "0.1", "ss_loss_type": "huber",
          "ss_huber_schedule": "snr", "ss_huber_c": "0.1", "ss_masked_loss": "True", "ss_min_snr_gamma": "",
          "ss_zero_terminal_snr": "False", "ss_max_timestep": "1000", "ss_mixed_precision": "bf16"}
    r = analyse(_file(), md)
    assert r["recipe"] == {"mixed_precision": "bf16", "noise_offset": "0.05", "ip_noise_gamma": "0.1",
                           "loss_type": "huber", "huber_schedule": "snr", "huber_c": "0.1", "masked_loss": "True"}
    assert ("  trained with: mixed_precision bf16, noise_offset 0.05, ip_noise_gamma 0.1, loss_type huber, "
            "huber_schedule snr, huber_c 0.1, masked_loss") in format_report("x.safetensors", r).splitlines()
    plain = analyse(_file(), {**SD1, "ss_loss_type": "l2", "ss_huber_schedule": "snr", "ss_huber_c": "0.1"})
    assert plain["recipe"] == {} and "trained with" not in format_report("x.safetensors", plain)
