"""Flux.1 / SD3.5 LoRA files: every key is a layer in the loaders' naming, at the trained strength,
and modules -> file -> modules is exact (fused q/k/v and linear1 included)."""

from __future__ import annotations

import re

import pytest
import torch
from dit_fixtures import (
    comfy_flux_map,
    comfy_mmdit_map,
    from_original,
    linear_weights,
    tiny_clip,
    tiny_flux,
    tiny_sd3,
    to_original,
)
from lora_fixtures import net_cfg, randomize

from lora_trainer import families
from lora_trainer.errors import LoraFormatError
from lora_trainer.families import flow_lora as dit_keys
from lora_trainer.lora import kohya
from lora_trainer.lora.inject import inject_lora
from lora_trainer.models.bundle import ModelBundle, TextEncoderPart

HIDDEN = 16


def _nothing(*_a: object, **_k: object) -> None:
    return None


@pytest.fixture
def family(request):
    """The registered family's name (its LoRA side is dit_keys')."""
    assert request.param in families.family_names()
    return request.param


def _bundle(name: str) -> tuple[ModelBundle, dict]:
    model = tiny_flux() if name == "flux1" else tiny_sd3()
    table = comfy_flux_map(2, 2, HIDDEN) if name == "flux1" else comfy_mmdit_map(3, HIDDEN, (0,))
    bundle = ModelBundle(arch=name, prediction_type="flow", unet=model, unet_naming="diffusers",
                         text_encoders=[TextEncoderPart("te1", tiny_clip(), "hf_clip")], vae=None,
                         alphas_cumprod=torch.ones(1), encode_images=_nothing, encode_text=_nothing,
                         predict=_nothing, name=f"tiny-{name}")
    return bundle, table


def _module_deltas(net) -> dict[tuple[str, str], torch.Tensor]:
    """{(root, module path): up @ down * alpha / rank} from the trained layers."""
    out = {}
    for key, m in net.modules().items():
        slot = net.layout[key]
        down, up = m.tensors["lora_down.weight"].float(), m.tensors["lora_up.weight"].float()
        out[(slot.root, slot.path)] = (up.flatten(1) @ down.flatten(1)) * (m.alpha / down.shape[0])
    return out


def _file_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a loader adds per file module: up @ down * alpha / rank (rank = lora_down rows)."""
    out = {}
    for key, w in kohya.from_kohya_tensors(tensors).items():
        out[key] = (w.up.float().flatten(1) @ w.down.float().flatten(1)) * (w.alpha / w.down.shape[0])
    return out


@pytest.mark.parametrize("family", ["flux1", "sd3"], indirect=True)
def test_every_key_is_a_whole_layer_of_the_loaders_model_at_trained_strength(family):
    """ComfyUI / Forge Neo / kohya: lora_unet_ + the original weight name; the whole weight gets
    up @ down * alpha / rank. Merged that way and mapped back with the loader's own table, the
    transformer's weights are the diffusers weights plus each trained module's delta."""
    bundle, table = _bundle(family)
    base = linear_weights(bundle.unet)
    net = inject_lora(bundle, net_cfg(rank=4, alpha=3.0, train_text_encoder=False))
    randomize(net, std=0.05)
    file = net.to_kohya(torch.float32)
    expected = dict(base)
    for (_, path), d in _module_deltas(net).items():
        expected[path] = base[path] + d.reshape(base[path].shape)
    original = to_original(base, table)
    loader_map = {"lora_unet_" + name.replace(".", "_"): name for name in original}
    unmatched = [k for k in _file_deltas(file) if k not in loader_map]
    assert not unmatched
    for key, d in _file_deltas(file).items():
        w = original[loader_map[key]]
        assert d.shape == w.flatten(1).shape, key
        original[loader_map[key]] = w + d.reshape(w.shape)
    got = from_original(original, table)
    trained = {p for _, p in _module_deltas(net)}
    assert trained and trained <= set(got)
    for path in trained:
        assert torch.allclose(got[path], expected[path], atol=1e-6), path
    # fused layers really are fused: no diffusers-only name reaches the file
    assert not any(re.search(r"to_[qkv]$|add_[qkv]_proj|proj_mlp|transformer_blocks_", k) for k in _file_deltas(file))


@pytest.mark.parametrize("family", ["flux1", "sd3"], indirect=True)
def test_modules_file_modules_round_trip_is_exact(family):
    bundle, _ = _bundle(family)
    net = inject_lora(bundle, net_cfg(rank=4, alpha=3.0))
    randomize(net, seed=3, std=0.05)
    before = net.modules()
    file = net.to_kohya(torch.float32)
    net.remove()
    bundle2, _ = _bundle(family)
    net2 = inject_lora(bundle2, net_cfg(rank=4, alpha=3.0))
    net2.load_kohya(file)
    after = net2.modules()
    assert set(after) == set(before) and any("@" in k for k in before)
    for key, m in before.items():
        for name, t in m.tensors.items():
            assert torch.equal(after[key].tensors[name], t), (key, name)
        assert after[key].alpha == pytest.approx(m.alpha, rel=1e-6)
    # and the file's text-encoder keys are the HF CLIP ones every loader maps for CLIP-L
    te = [k for k in _file_deltas(file) if k.startswith("lora_te")]
    assert te and all(re.fullmatch(r"lora_te1_text_model_encoder_layers_\d+_(self_attn_[qkv]_proj|self_attn_out_proj"
                                   r"|mlp_fc[12])", k) for k in te)


@pytest.mark.parametrize("family", ["flux1", "sd3"], indirect=True)
def test_init_from_a_file_continues_with_the_same_modules(family, tmp_path):
    from safetensors.torch import save_file

    bundle, _ = _bundle(family)
    net = inject_lora(bundle, net_cfg(rank=4, alpha=3.0, train_text_encoder=False))
    randomize(net, seed=5)
    path = tmp_path / "dit.safetensors"
    save_file(net.to_kohya(torch.float32), str(path))
    bundle2, _ = _bundle(family)
    net2 = inject_lora(bundle2, net_cfg(rank=8, alpha=1.0, train_text_encoder=False, init_from=str(path)))
    assert set(net2.layout) == set(net.layout)
    assert all(torch.equal(net2.modules()[k].tensors[n], t) for k, m in net.modules().items() for n, t in m.tensors.items())


def _lora(rank: int, fan_in: int, out: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"lora_down.weight": torch.randn(rank, fan_in, generator=g), "lora_up.weight": torch.randn(out, rank, generator=g),
            "alpha": torch.tensor(alpha)}


def _flat(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": t for k, m in modules.items() for n, t in m.items()}


def test_fusion_of_some_parts_with_different_ranks_and_alphas_keeps_each_delta():
    base = "lora_unet_single_blocks_0_linear1"
    parts = {f"{base}@q": _lora(4, HIDDEN, HIDDEN, 2.0, 1), f"{base}@v": _lora(2, HIDDEN, HIDDEN, 5.0, 2),
             f"{base}@mlp": _lora(4, HIDDEN, 4 * HIDDEN, 4.0, 3)}
    file = dit_keys.file_tensors("flux1", _flat(parts))
    assert set(file) == {f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"}
    fused = _file_deltas(file)[base]
    want = torch.cat([_file_deltas(_flat({"lora_unet_x": parts[f"{base}@q"]}))["lora_unet_x"], torch.zeros(HIDDEN, HIDDEN),
                      _file_deltas(_flat({"lora_unet_x": parts[f"{base}@v"]}))["lora_unet_x"],
                      _file_deltas(_flat({"lora_unet_x": parts[f"{base}@mlp"]}))["lora_unet_x"]])
    assert torch.allclose(fused, want, atol=1e-5)
    back = dit_keys.module_tensors("flux1", file)
    assert {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in back} == set(parts)
    for key in parts:
        got = _file_deltas({k: v for k, v in back.items() if k.startswith(key + ".")})[key]
        assert torch.allclose(got, _file_deltas(_flat({key: parts[key]}))[key], atol=1e-5), key


def test_a_lora_trained_on_the_fused_layer_splits_exactly():
    """kohya's lora_flux without split_qkv trains one LoRA on qkv: each part gets the whole down."""
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    file = _flat({key: _lora(4, HIDDEN, 3 * HIDDEN, 4.0, 7)})
    back = dit_keys.module_tensors("flux1", file)
    whole = _file_deltas(file)[key]
    for i, tag in enumerate("qkv"):
        part = _file_deltas({k: v for k, v in back.items() if k.startswith(f"{key}@{tag}.")})[f"{key}@{tag}"]
        assert torch.equal(part, whole[i * HIDDEN:(i + 1) * HIDDEN])


def test_swapped_layers_exchange_their_halves_only_when_two_chunks():
    two = {"lora_unet_final_layer_adaLN_modulation_1@ss": _lora(2, HIDDEN, 2 * HIDDEN, 2.0, 1)}
    six = {"lora_unet_joint_blocks_0_context_block_adaLN_modulation_1@ss": _lora(2, HIDDEN, 6 * HIDDEN, 2.0, 2)}
    f2 = dit_keys.file_tensors("flux1", _flat(two))
    up = two["lora_unet_final_layer_adaLN_modulation_1@ss"]["lora_up.weight"]
    assert torch.equal(f2["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"], torch.cat([up[HIDDEN:], up[:HIDDEN]]))
    f6 = dit_keys.file_tensors("sd3", _flat(six))
    assert torch.equal(f6["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1.lora_up.weight"],
                       six["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1@ss"]["lora_up.weight"])
    assert dit_keys.module_tensors("flux1", f2).keys() == _flat(two).keys()


@pytest.mark.parametrize(("family", "path", "key"), [
    ("flux1", "transformer_blocks.3.attn.add_k_proj", "lora_unet_double_blocks_3_txt_attn_qkv@k"),
    ("flux1", "single_transformer_blocks.12.proj_mlp", "lora_unet_single_blocks_12_linear1@mlp"),
    ("flux1", "single_transformer_blocks.0.proj_out", "lora_unet_single_blocks_0_linear2"),
    ("flux1", "transformer_blocks.1.norm1_context.linear", "lora_unet_double_blocks_1_txt_mod_lin"),
    ("sd3", "transformer_blocks.2.attn2.to_v", "lora_unet_joint_blocks_2_x_block_attn2_qkv@v"),
    ("sd3", "transformer_blocks.0.ff_context.net.2", "lora_unet_joint_blocks_0_context_block_mlp_fc2"),
    ("sd3", "transformer_blocks.0.attn.to_add_out", "lora_unet_joint_blocks_0_context_block_attn_proj"),
])
def test_key_table_both_ways(family, path, key):
    assert dit_keys.dit_lora_key(family, "unet", path) == key
    assert dit_keys.dit_module_path(family, key) == ("unet", path)
    assert dit_keys.known_file_key(family, dit_keys.split_key(key)[0])


def test_text_encoder_keys_and_unknown_modules():
    assert dit_keys.dit_lora_key("sd3", "te2", "text_model.encoder.layers.4.mlp.fc1") == \
        "lora_te2_text_model_encoder_layers_4_mlp_fc1"
    assert dit_keys.dit_module_path("sd3", "lora_te3_encoder_block_0_layer_0_SelfAttention_q") == \
        ("te3", "encoder.block.0.layer.0.SelfAttention.q")
    with pytest.raises(LoraFormatError, match="transformer module 'transformer_blocks.0.attn.norm_q'"):
        dit_keys.dit_lora_key("flux1", "unet", "transformer_blocks.0.attn.norm_q")
    with pytest.raises(LoraFormatError, match="unknown LoRA root"):
        dit_keys.dit_lora_key("flux1", "te3", "x")
    assert not dit_keys.known_file_key("flux1", "lora_unet_double_blocks_0_img_attn_qkv@q")
    assert not dit_keys.known_file_key("sd3", "lora_unet_double_blocks_0_img_attn_qkv")


def test_family_from_metadata_and_keys():
    for name, md in dit_keys.DIT_METADATA.items():
        assert dit_keys.dit_family_from_keys(set(), md) == ("flux1" if name.startswith("flux") else "sd3")
    assert dit_keys.dit_family_from_keys({"lora_unet_single_blocks_0_linear1"}, {}) == "flux1"
    assert dit_keys.dit_family_from_keys({"lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"}, {}) == "sd3"
    assert dit_keys.dit_family_from_keys({"lora_unet_down_blocks_0_attentions_0_proj_in"},
                                         {"ss_base_model_version": "sd_v1"}) is None
    assert dit_keys.variant_from_metadata(dit_keys.DIT_METADATA["flux1-schnell"]) == "flux1-schnell"


@pytest.mark.parametrize("family", ["flux1", "sd3"], indirect=True)
def test_registry_detects_our_files_from_keys_alone_and_from_metadata(family):
    bundle, _ = _bundle(family)
    net = inject_lora(bundle, net_cfg(rank=2, alpha=1.0))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in net.to_kohya()}
    assert families.detect_lora(modules, {}).name == family
    variant = "flux1-dev" if family == "flux1" else "sd3.5-large"
    assert families.detect_lora(set(), dict(dit_keys.DIT_METADATA[variant])).name == family


def test_fp16_file_keeps_fp16_weights_and_float32_alpha_whatever_the_order():
    key = "lora_unet_double_blocks_0_img_attn_qkv@q"
    t = {f"{key}.alpha": torch.tensor(0.1), f"{key}.lora_down.weight": torch.randn(2, HIDDEN).half(),
         f"{key}.lora_up.weight": torch.randn(HIDDEN, 2).half()}
    file = dit_keys.file_tensors("flux1", t)
    assert {str(v.dtype) for k, v in file.items() if not k.endswith("alpha")} == {"torch.float16"}
    assert file["lora_unet_double_blocks_0_img_attn_qkv.alpha"].dtype == torch.float32
    back = dit_keys.module_tensors("flux1", file)
    assert torch.equal(back[f"{key}.lora_down.weight"], t[f"{key}.lora_down.weight"])
    assert back[f"{key}.alpha"].item() == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("family", ["flux1"], indirect=True)
def test_lycoris_types_on_fused_layers_are_refused_before_training(family):
    from lora_trainer.errors import ConfigError

    bundle, _ = _bundle(family)
    with pytest.raises(ConfigError, match="network.type loha: FLUX.1 LoRA files store 'lora_unet_double_blocks_0_img_attn_qkv'"):
        inject_lora(bundle, net_cfg(type="loha", train_text_encoder=False))
    assert not any("lora" in n for n, _ in bundle.unet.named_modules())  # nothing was injected
