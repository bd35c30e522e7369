"""LoCon, DoRA, LoHa, LoKr: file format, the loaders' reading of it, round trips, strength, config."""

from __future__ import annotations

import json

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg, randomize, same_snapshot, snapshot
from test_lora_inject import _te_out, _unet_out

from lora_trainer.config import build_config, flatten_user_dict, load_config
from lora_trainer.errors import ConfigError, LoraFormatError
from lora_trainer.lora import kohya, kohya_tensors, reader, variants
from lora_trainer.lora.files import save_lora_file
from lora_trainer.lora.inject import _candidate_layout, inject_lora
from lora_trainer.lora.kohya_tensors import ModuleTensors
from lora_trainer.lora.metadata import network_module_args

TYPES = ["lora", "locon", "dora", "loha", "lokr"]
# alpha != rank everywhere; LoCon's 3x3 convs have their own rank and alpha.
CFG = dict(rank=4, alpha=1.5, conv_rank=2, conv_alpha=0.75)
FILE_TENSORS = {
    "lora": {"lora_down.weight", "lora_up.weight", "alpha"},
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
}


def _cfg(typ: str, **kw: object):
    c = dict(CFG, type=typ)
    if typ != "locon":
        c.pop("conv_rank"), c.pop("conv_alpha")
    return net_cfg(**{**c, **kw})


def _layers(bundle):
    roots = {k: (m, bundle.naming_of(k)) for k, m in bundle.trainable_roots().items()}
    return {k: roots[s.root][0].get_submodule(s.path) for k, s in _candidate_layout(bundle.arch, roots).items()}


# --- the reader against deltas computed by hand ------------------------------------------------
def test_reader_lora_and_locon_deltas_by_hand():
    m = ModuleTensors("lora", {"lora_up.weight": torch.tensor([[1.0], [2.0]]),
                               "lora_down.weight": torch.tensor([[3.0, 4.0]])}, alpha=0.5)
    assert torch.equal(reader.module_delta(m, torch.zeros(2, 2)), torch.tensor([[1.5, 2.0], [3.0, 4.0]]))
    # 3x3 conv: down (r, in, 3, 3), up (out, r, 1, 1); rank 2, alpha 1 -> scale 0.5
    down = torch.arange(2 * 1 * 9, dtype=torch.float32).reshape(2, 1, 3, 3)
    up = torch.tensor([[1.0, -1.0]]).reshape(1, 2, 1, 1)
    conv = ModuleTensors("lora", {"lora_up.weight": up, "lora_down.weight": down}, alpha=1.0)
    want = 0.5 * (down[0] - down[1]).unsqueeze(0)
    assert torch.equal(reader.module_delta(conv, torch.zeros(1, 1, 3, 3), multiplier=1.0), want)
    assert torch.equal(reader.module_delta(conv, torch.zeros(1, 1, 3, 3), multiplier=0.5), want / 2)


def test_reader_loha_delta_by_hand():
    t = {"hada_w1_a": torch.tensor([[1.0], [2.0]]), "hada_w1_b": torch.tensor([[1.0, 3.0]]),
         "hada_w2_a": torch.tensor([[2.0], [1.0]]), "hada_w2_b": torch.tensor([[1.0, -1.0]])}
    # (w1a w1b) = [[1,3],[2,6]]; (w2a w2b) = [[2,-2],[1,-1]]; product [[2,-6],[2,-6]]; scale 3/1
    got = reader.module_delta(ModuleTensors("loha", t, alpha=3.0), torch.zeros(2, 2))
    assert torch.equal(got, torch.tensor([[6.0, -18.0], [6.0, -18.0]]))


def test_reader_lokr_deltas_by_hand():
    w1, w2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [3.0]])
    kron = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # kron((1,2), (2,1)) -> (2, 2)
    whole = ModuleTensors("lokr", {"lokr_w1": w1, "lokr_w2": w2}, alpha=8.0)
    assert whole.rank is None and torch.equal(reader.module_delta(whole, torch.zeros(2, 2)), kron)  # scale 1
    pair = ModuleTensors("lokr", {"lokr_w1": w1, "lokr_w2_a": torch.tensor([[1.0, 0.0], [3.0, 0.0]]),
                                  "lokr_w2_b": torch.tensor([[1.0], [5.0]])}, alpha=1.0)  # rank 2 -> scale 0.5
    assert torch.equal(reader.module_delta(pair, torch.zeros(2, 2)), kron / 2)
    both = ModuleTensors("lokr", {"lokr_w1_a": torch.tensor([[1.0]]), "lokr_w1_b": torch.tensor([[1.0, 2.0]]),
                                  "lokr_w2_a": torch.tensor([[1.0, 0.0], [3.0, 0.0]]),
                                  "lokr_w2_b": torch.tensor([[1.0], [5.0]])}, alpha=1.0)
    assert torch.equal(reader.module_delta(both, torch.zeros(2, 2)), kron / 2)  # lokr_w2_b's rank (2), not w1_b's
    conv = ModuleTensors("lokr", {"lokr_w1": torch.tensor([[2.0]]), "lokr_w2": torch.ones(1, 1, 3, 3)}, alpha=1.0)
    assert torch.equal(reader.module_delta(conv, torch.zeros(1, 1, 3, 3)), torch.full((1, 1, 3, 3), 2.0))


def test_reader_dora_delta_by_hand():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    t = {"lora_up.weight": torch.tensor([[0.0], [1.0]]), "lora_down.weight": torch.tensor([[0.0, 1.0]]),
         "dora_scale": torch.tensor([[10.0, 2.0]])}
    # W + dW = [[3,0],[4,2]]; column norms (5, 2); W' = [[3*10/5, 0], [4*10/5, 2*2/2]] = [[6,0],[8,2]]
    got = reader.module_delta(ModuleTensors("dora", t, alpha=1.0), w)
    assert torch.equal(got, torch.tensor([[6.0, 0.0], [8.0, 2.0]]) - w)


# --- the trained model equals the file read like the loaders do --------------------------------
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("typ", TYPES)
def test_file_read_like_the_loaders_reproduces_the_trained_model(arch, typ, tmp_path):
    bundle = make_bundle(arch)
    net = inject_lora(bundle, _cfg(typ))
    randomize(net, std=0.2)
    te_key = "te1" if arch == "sdxl" else "te"
    tokens = torch.randint(0, 1000, (1, 77), generator=torch.Generator().manual_seed(0))
    base_free = _unet_out(bundle)
    trained_unet, trained_te = _unet_out(bundle), _te_out(bundle, te_key, tokens)
    path = save_lora_file(tmp_path / "v.safetensors", net.to_kohya(torch.float16), {})
    net.set_scale(0.0)
    untouched = _unet_out(bundle)
    net.remove()
    assert not torch.allclose(trained_unet, untouched, atol=1e-2)  # the comparison below is not vacuous
    from lora_trainer.lora.files import read_lora_file

    tensors, _ = read_lora_file(path)
    assert {k.split(".", 1)[1] for k in tensors} == FILE_TENSORS[typ]
    assert reader.merge_file(tensors, _layers(bundle)) == len(net.layout)
    # fp16 file: the deltas carry fp16 rounding (~1e-3 relative); the model's outputs are ~1.
    assert torch.allclose(_unet_out(bundle), trained_unet, atol=2e-3, rtol=2e-3)
    assert torch.allclose(_te_out(bundle, te_key, tokens), trained_te, atol=2e-3, rtol=2e-3)
    assert base_free.shape == trained_unet.shape


@pytest.mark.parametrize("typ", TYPES)
def test_fp32_file_matches_exactly_and_strength_blends(typ, tmp_path):
    bundle = make_bundle("sd1")
    net = inject_lora(bundle, _cfg(typ))
    randomize(net, std=0.2)
    net.set_scale(0.5)
    half = _unet_out(bundle)
    net.set_scale(1.0)
    sd = net.to_kohya(torch.float32)
    net.remove()
    layers = _layers(bundle)
    reader.merge_file(sd, layers, multiplier=0.5)
    assert torch.allclose(_unet_out(bundle), half, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("typ", TYPES)
def test_round_trip_through_init_from(arch, typ, tmp_path):
    """file -> a new network (init_from, other rank/alpha in the config) -> file: same tensors."""
    bundle = make_bundle(arch)
    before = snapshot(bundle.unet)
    net = inject_lora(bundle, _cfg(typ))
    randomize(net, std=0.2)
    sd = net.to_kohya(torch.float32)
    want = _unet_out(bundle)
    path = save_lora_file(tmp_path / "v.safetensors", sd, {})
    assert {v.item() for k, v in sd.items() if k.endswith(".alpha")} == ({1.5, 0.75} if typ == "locon" else {1.5})
    net.remove()
    assert same_snapshot(before, snapshot(bundle.unet))
    again = inject_lora(bundle, _cfg(typ, rank=4 if typ == "lokr" else 8, alpha=3.0, init_from=str(path)))
    back = again.to_kohya(torch.float32)
    assert back.keys() == sd.keys()
    for k in sd:  # LoKr's folded alpha/rank is divided out and in again: float rounding
        assert torch.allclose(back[k], sd[k], rtol=1e-6, atol=0) if "lokr_w1" in k else torch.equal(back[k], sd[k]), k
    assert torch.allclose(_unet_out(bundle), want, atol=1e-6)
    state = again.state_dict()
    again.load_state_dict(state)
    reloaded = again.state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in state.items())
    again.remove()
    assert same_snapshot(before, snapshot(bundle.unet))


def test_locon_adds_the_resnet_convs_with_their_own_rank():
    bundle = make_bundle("sd1")
    plain = set(inject_lora(bundle, _cfg("lora")).to_kohya())
    bundle = make_bundle("sd1")
    net = inject_lora(bundle, _cfg("locon"))
    sd = net.to_kohya()
    extra = {k.rsplit(".", 2)[0] for k in set(sd) - plain}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in {k.split(".")[0] for k in sd}
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 0.75
    assert sd["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in {k.split(".")[0] for k in sd} and extra
    # every LoCon key is a module A1111's kohya-name rules know
    assert all(kohya.known_module_key("sd1", k.split(".")[0]) for k in sd if k.startswith("lora_unet_"))


def test_dora_scale_is_per_input_channel():
    bundle = make_bundle("sd1")
    sd = inject_lora(bundle, _cfg("dora", conv_rank=2)).to_kohya(torch.float32)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{key}.dora_scale"].shape == (1, 32)  # to_k: 32 (context) -> 32
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd[f"{conv}.dora_scale"].shape == (1, 32, 1, 1)
    w = _layers(make_bundle("sd1"))[conv].weight  # a fresh DoRA's magnitude is the base's column norm
    assert torch.allclose(sd[f"{conv}.dora_scale"], reader.column_norm(w))


def test_lokr_scaling_shim_for_peft_before_0_14(monkeypatch):
    """peft 0.13.2 (the A1111 installer's) leaves alpha/rank out of LoKr's update."""
    from peft.tuners.lokr.layer import LoKrLayer

    scaled = LoKrLayer.get_delta_weight

    def unscaled(self, adapter_name, *a, **k):
        return scaled(self, adapter_name, *a, **k) / self.scaling[adapter_name]

    simulated = variants.peft_scales_lokr()  # on a real peft < 0.14 there is nothing to simulate
    if simulated:
        monkeypatch.setattr(LoKrLayer, "get_delta_weight", unscaled)
        variants.peft_scales_lokr.cache_clear()
    try:
        assert not variants.peft_scales_lokr()
        bundle = make_bundle("sd1")
        net = inject_lora(bundle, _cfg("lokr", train_text_encoder=False))
        randomize(net, std=0.2)
        key = next(iter(net.layout))
        layer = net._module(net.layout[key])
        m = net.modules()[key]
        assert torch.allclose(layer.get_delta_weight("default"), reader.module_delta(m, layer.get_base_layer().weight),
                              atol=1e-6)
    finally:
        monkeypatch.undo()
        variants.peft_scales_lokr.cache_clear()
    assert variants.peft_scales_lokr() == simulated


# --- metadata, config and refusals --------------------------------------------------------------
@pytest.mark.parametrize("typ,module,args", [
    ("lora", "networks.lora", {}),
    ("locon", "networks.lora", {"conv_dim": "2", "conv_alpha": "0.75"}),
    ("dora", "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "False"}),
    ("loha", "lycoris.kohya", {"algo": "loha"}),
    ("lokr", "lycoris.kohya", {"algo": "lokr", "factor": "-1"}),
])
def test_network_metadata(typ, module, args):
    assert network_module_args(_cfg(typ)) == (module, args)
    assert json.loads(json.dumps(args)) == args


def test_kohya_and_lycoris_config_keys():
    cfg = build_config(flatten_user_dict({"network_module": "lycoris.kohya",
                                          "network_args": ["algo=loha", "conv_dim=8", "conv_alpha=4"]}))
    n = cfg.network
    assert (n.type, n.conv_rank, n.conv_alpha) == ("loha", 8, 4.0)
    assert build_config(flatten_user_dict({"network_module": "lycoris.kohya"})).network.type == "locon"
    assert build_config(flatten_user_dict({"network_args": ["algo=lora", "dora_wd=true"]})).network.type == "dora"
    kohya_locon = build_config(flatten_user_dict({"network_module": "networks.lora", "conv_dim": 4})).network
    assert (kohya_locon.type, kohya_locon.conv_rank) == ("lora", 4)
    assert load_config(None, ["network.type=LoKr"]).network.type == "lokr"


@pytest.mark.parametrize("values,message", [
    ({"network_module": "networks.dylora"}, "network_module: 'networks.dylora' is not supported"),
    ({"network_args": ["algo=ia3"]}, "algo=ia3 is not supported"),
    ({"network_args": ["conv_dim"]}, "'conv_dim' is not key=value"),
    ({"network_args": ["use_tucker=True"]}, "use_tucker=True: the Tucker decomposition"),
    ({"network_args": ["preset=x.toml"]}, "network.lycoris_preset"),
    ({"network_args": ["tucker=True"]}, "'tucker' is not supported"),
    ({"network_args": ["algo=loha", "dora_wd=True"]}, "DoRA works with algo=lora/locon only"),
    ({"network.type": "loha", "network.dropout": 0.1}, "network.dropout: 0.1 works with network.type lora/locon"),
    ({"network.conv_rank": 0}, "network.conv_rank: 0 must be at least 1"),
    ({"network.type": "lycoris"}, "network.type: 'lycoris' is not allowed"),
])
def test_impossible_network_settings_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")) as e:
        build_config(flatten_user_dict(values))
    assert "\n" not in str(e.value)


def test_init_from_a_file_of_another_type_is_refused(tmp_path):
    bundle = make_bundle("sd1")
    net = inject_lora(bundle, _cfg("loha"))
    path = save_lora_file(tmp_path / "h.safetensors", net.to_kohya(), {})
    net.remove()
    with pytest.raises(ConfigError, match="is a loha network; set network.type to loha"):
        inject_lora(bundle, _cfg("lora", init_from=str(path)))
    with pytest.raises(LoraFormatError, match="needs"):
        inject_lora(bundle, _cfg("loha")).load_kohya(inject_lora(make_bundle("sd1"), _cfg("lora")).to_kohya())


@pytest.mark.parametrize("typ", ["dora", "loha", "lokr"])
def test_open_clip_attention_takes_lora_only(typ):
    bundle = make_bundle("sd2", te_naming="open_clip")
    before = snapshot(bundle.unet)
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        inject_lora(bundle, _cfg(typ))
    assert same_snapshot(before, snapshot(bundle.unet))
    inject_lora(bundle, _cfg(typ, train_text_encoder=False)).remove()


def test_the_tab_offers_every_network_type_with_a_line_each(tmp_path):
    from lora_trainer.config import NETWORK_TYPE_HELP
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.ui.tab import build_tab

    ctx = build_tab(StandaloneHost(lora_dir=tmp_path)).lt_context
    comp = ctx.fields["network.type"]
    choices = [c[1] if isinstance(c, (list, tuple)) else c for c in comp.choices]
    assert choices == TYPES and set(NETWORK_TYPE_HELP) == set(TYPES)
    assert all(line in comp.info for line in NETWORK_TYPE_HELP.values())
    values = [comp.value for comp in ctx.inputs]
    values[ctx.inputs.index(comp)] = "loha"
    assert ctx.config(values).network.type == "loha"


@pytest.mark.parametrize("typ", ["locon", "loha"])
def test_the_webuis_ldm_unet_gets_the_same_keys(typ):
    """A1111 trains its own LDM UNet in place: LoCon's ResBlock/Downsample/Upsample layers get the
    kohya names the diffusers UNet's ResnetBlock2D/Downsample2D/Upsample2D get."""
    from lora_fixtures import ldm_unet

    from lora_trainer.models.tiny import build_components

    cfg = _cfg(typ, conv_rank=2, train_text_encoder=False)
    ldm = make_bundle("sd1", build_components("sd1"), unet=ldm_unet("sd1"), unet_naming="ldm")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LDM zero-initialises its output layers: the output would be 0 whatever the LoRA
        for p in ldm.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    base = _ldm_out(ldm.unet)
    net = inject_lora(ldm, cfg)
    ldm_keys = set(net.layout)
    assert ldm_keys == set(inject_lora(make_bundle("sd1"), cfg).layout)
    assert "lora_unet_down_blocks_1_resnets_0_conv_shortcut" in ldm_keys
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in ldm_keys
    randomize(net, std=0.2)
    sd = net.to_kohya(torch.float32)
    before = _ldm_out(ldm.unet)
    assert not torch.allclose(before, base, atol=1e-3)
    net.remove()
    roots = {"unet": (ldm.unet, "ldm")}
    layers = {k: ldm.unet.get_submodule(s.path) for k, s in _candidate_layout("sd1", roots).items()}
    reader.merge_file(sd, layers)
    assert torch.allclose(_ldm_out(ldm.unet), before, atol=1e-5, rtol=1e-5)


def _ldm_out(unet):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return unet(x, timesteps=torch.tensor([10]), context=ctx)


def test_strict_reader_of_every_kind_names_the_module():
    z = torch.zeros(2, 2)
    with pytest.raises(LoraFormatError, match="lora_unet_a.*lokr_w1_a and lokr_w1_b"):
        kohya_tensors.read_modules({"lora_unet_a.lokr_w1_a": z, "lora_unet_a.lokr_w2": z, "lora_unet_a.alpha": torch.tensor(1.0)})
    with pytest.raises(LoraFormatError, match="lora_unet_b.*no complete"):
        kohya_tensors.read_modules({"lora_unet_b.lora_down.weight": z, "lora_unet_b.lora_up.weight": z,
                            "lora_unet_b.hada_w1_a": z, "lora_unet_b.alpha": torch.tensor(1.0)})
    with pytest.raises(LoraFormatError, match="lora_unet_c.*no alpha"):
        kohya_tensors.read_modules({"lora_unet_c.lora_down.weight": z, "lora_unet_c.lora_up.weight": z})
    with pytest.raises(LoraFormatError, match="lora_unet_d.oft_blocks"):
        kohya_tensors.read_modules({"lora_unet_d.oft_blocks": z})
    ok = {"lora_unet_e.lora_down.weight": z, "lora_unet_e.lora_up.weight": z, "lora_unet_e.dora_scale": z[:1],
          "lora_unet_e.alpha": torch.tensor(2.0)}
    m = kohya_tensors.read_modules(ok)["lora_unet_e"]
    assert (m.kind, m.alpha, m.rank) == ("dora", 2.0, 2)
    assert kohya_tensors.write_modules({"lora_unet_e": m}, torch.float32).keys() == ok.keys()


# --- LoKr's factor and decompose_both -----------------------------------------------------------
_TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # a 32 -> 32 Linear


@pytest.mark.parametrize("factor,both,rank,side", [(-1, False, 2, 4), (2, False, 2, 2), (4, True, 1, 4)])
def test_lokr_factor_and_decompose_both_shape_the_file_and_round_trip(factor, both, rank, side, tmp_path):
    """factor f gives lokr_w1 f x f where f divides the sizes (-1: as square as possible); a file of
    any of them continues (init_from) and renders (inject_file) with the same tensors, whatever the
    config says."""
    from lora_trainer.lora.inject import inject_file

    bundle = make_bundle("sd1")
    net = inject_lora(bundle, _cfg("lokr", rank=rank, lokr_factor=factor, lokr_decompose_both=both))
    randomize(net, std=0.2)
    sd = net.to_kohya(torch.float32)
    want = _unet_out(bundle)
    # 32 = 4 x 8 as square as possible, 2 x 16 with factor 2; the 4 x 4 factor is a rank-1 pair with both
    w1_shape = (sd[f"{_TO_K}.lokr_w1_a"].shape[0], sd[f"{_TO_K}.lokr_w1_b"].shape[1]) if both else \
        sd[f"{_TO_K}.lokr_w1"].shape
    assert tuple(w1_shape) == (side, side) and (f"{_TO_K}.lokr_w1_a" in sd) == both
    path = save_lora_file(tmp_path / "k.safetensors", sd, {})
    net.remove()
    for load in (lambda: inject_lora(bundle, _cfg("lokr", rank=8, init_from=str(path))),
                 lambda: inject_file(bundle, str(path))):
        again = load()
        back = again.to_kohya(torch.float32)
        # a file of -1 is rebuilt with -1; one of factor 2 with the first factor that builds it
        assert back.keys() == sd.keys() and again.lokr == (factor, both)
        assert all(torch.allclose(back[k], v, rtol=1e-6, atol=0) for k, v in sd.items())
        assert torch.allclose(_unet_out(bundle), want, atol=1e-6)
        again.remove()


def test_lokr_file_with_two_whole_factors_renders_whatever_the_config_rank(tmp_path):
    """LyCORIS writes a LoKr module whose rank reaches half a factor's size as two whole
    factors (no rank in the file); rebuilding it needs a rank that keeps them whole."""
    from lora_trainer.lora.inject import inject_file

    bundle = make_bundle("sd1")
    net = inject_lora(bundle, _cfg("lokr", rank=64, alpha=8.0, train_text_encoder=False))
    randomize(net, std=0.2)
    sd = net.to_kohya(torch.float32)
    assert all(not k.endswith(("_a", "_b")) for k in sd)  # every factor whole
    want = _unet_out(bundle)
    path = save_lora_file(tmp_path / "whole.safetensors", sd, {})
    net.remove()
    again = inject_lora(bundle, _cfg("lokr", rank=1, init_from=str(path), train_text_encoder=False))
    assert torch.allclose(_unet_out(bundle), want, atol=1e-6)
    back = again.to_kohya(torch.float32)
    assert all(torch.allclose(back[k], v, rtol=1e-6, atol=0) for k, v in sd.items())
    again.remove()
    inject_file(bundle, str(path)).remove()


def test_lokr_file_of_no_single_factor_is_a_one_line_error(tmp_path):
    bundle = make_bundle("sd1")
    sd = inject_lora(bundle, _cfg("lokr", rank=2, train_text_encoder=False)).to_kohya(torch.float32)
    sd[f"{_TO_K}.lokr_w1"] = torch.zeros(8, 8)  # 32 = 8 x 4: w2 would have to be 4 x 4
    path = save_lora_file(tmp_path / "odd.safetensors", sd, {})
    with pytest.raises(LoraFormatError, match=f"lokr_w1 8x8 on {_TO_K}, a 32x32 layer") as e:
        inject_lora(make_bundle("sd1"), _cfg("lokr", init_from=str(path), train_text_encoder=False))
    assert "\n" not in str(e.value)


def test_lokr_settings_from_kohya_and_lora_scripts_keys():
    n = build_config(flatten_user_dict({"network_module": "lycoris.kohya", "network_args": [
        "conv_dim=4", "conv_alpha=1", "dropout=0", "algo=lokr", "factor=8", "decompose_both=True",
        "train_norm=False"]})).network
    assert (n.type, n.lokr_factor, n.lokr_decompose_both, n.conv_rank) == ("lokr", 8, True, 4)
    # lora-scripts' own keys (its LoKr preset): lycoris_algo, lokr_factor, train_norm
    n = build_config(flatten_user_dict({"network_module": "lycoris.kohya", "lycoris_algo": "lokr", "lokr_factor": 8,
                                        "train_norm": False})).network
    assert (n.type, n.lokr_factor) == ("lokr", 8)
    # network_args' algo is the more specific; lycoris_algo alone says LyCORIS too
    n = build_config(flatten_user_dict({"lycoris_algo": "loha", "network_args": ["algo=lokr"]})).network
    assert n.type == "lokr"
    assert build_config(flatten_user_dict({"lycoris_algo": "loha"})).network.type == "loha"
    assert network_module_args(_cfg("lokr", lokr_factor=8, lokr_decompose_both=True))[1] == {
        "algo": "lokr", "factor": "8", "decompose_both": "True"}


@pytest.mark.parametrize("values,message", [
    ({"network_module": "networks.lora", "lycoris_algo": "lokr"},
     "lycoris_algo: 'lokr' needs network_module = \"lycoris.kohya\" (it is 'networks.lora')"),
    ({"lycoris_algo": "ia3"}, "lycoris_algo: ia3 is not supported"),
    ({"network_args": ["algo=lokr", "train_norm=True"]}, "train_norm=True: LyCORIS' training of the norm layers"),
    ({"train_norm": True}, "train_norm: True is not supported here; LyCORIS' training of the norm layers"),
    ({"network.lokr_factor": 0}, "network.lokr_factor: 0 must be -1 (as square as possible) or at least 1"),
])
def test_impossible_lokr_settings_are_one_line_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")) as e:
        build_config(flatten_user_dict(values))
    assert "\n" not in str(e.value)


def test_lora_scripts_lokr_file_loads_from_disk(tmp_path):
    """A lora-scripts TOML with its LoKr preset's keys, read as a config file: the same settings,
    and a file naming lycoris_algo with another network_module is refused naming the file."""
    toml = tmp_path / "lokr.toml"
    toml.write_text('network_module = "lycoris.kohya"\nlycoris_algo = "lokr"\nlokr_factor = 8\ntrain_norm = false\n'
                    'network_dim = 8\n', encoding="utf-8")
    n = load_config(toml).network
    assert (n.type, n.lokr_factor, n.rank) == ("lokr", 8, 8)
    toml.write_text('network_module = "networks.lora"\nlycoris_algo = "lokr"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"{toml}: lycoris_algo"):
        load_config(toml)
