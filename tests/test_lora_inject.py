"""LoRA injection: kohya <-> peft round trips, exact removal, strength, strict loading, MHA."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg, randomize, same_snapshot, snapshot
from torch import nn

from lora_trainer.errors import HostError, LoraFormatError
from lora_trainer.lora.files import read_lora_file, save_lora_file
from lora_trainer.lora.inject import inject_lora
from lora_trainer.lora.mha import LoraMultiheadAttention

# SDXL with an open_clip te2 covers both text-encoder namings at once.
CASES = [("sd1", "hf_clip"), ("sd2", "open_clip"), ("sdxl", "open_clip")]


def _te_out(bundle, key, tokens):
    module = dict(bundle.trainable_roots())[key]
    out = module(tokens)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out).detach()


def _unet_out(bundle):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx_dim = 64 if bundle.arch == "sdxl" else 32
    ctx = torch.randn(1, 5, ctx_dim, generator=g)
    kw = {}
    if bundle.arch == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.ones(1, 6)}
    return bundle.unet(x, torch.tensor([10]), ctx, **kw).sample.detach()


@pytest.mark.parametrize("arch,te_naming", CASES)
def test_kohya_round_trip_is_bit_exact(arch, te_naming, tmp_path):
    """peft -> kohya file -> the model again (init_from) -> kohya: same tensors, same outputs."""
    bundle = make_bundle(arch, te_naming=te_naming)
    net = inject_lora(bundle, net_cfg())
    randomize(net)
    sd = net.to_kohya(torch.float32)
    te_keys = ["te1", "te2"] if arch == "sdxl" else ["te"]
    prefixes = {k.split("text_model")[0] for k in sd if not k.startswith("lora_unet_")}
    assert prefixes == {f"lora_{k}_" for k in te_keys}
    assert all(sd[k].item() == 1.5 for k in sd if k.endswith(".alpha"))
    assert all(v.dtype == torch.float32 for v in sd.values())
    if arch == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in sd)
    else:
        assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].dim() == (2 if arch == "sd2" else 4)
    tokens = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    want = {key: _te_out(bundle, key, tokens) for key in te_keys}
    want_unet = _unet_out(bundle)
    path = save_lora_file(tmp_path / "x.safetensors", sd, {"ss_network_dim": "4"})
    net.remove()

    net_b = inject_lora(bundle, net_cfg(rank=16, alpha=8.0, init_from=str(path)))
    sd_b = net_b.to_kohya(torch.float32)
    assert sd_b.keys() == sd.keys() and all(torch.equal(sd[k], sd_b[k]) for k in sd)
    for key in te_keys:
        assert torch.equal(_te_out(bundle, key, tokens), want[key])
    assert torch.equal(_unet_out(bundle), want_unet)
    # ... and the file read back is the same mapping, kohya -> peft -> kohya.
    tensors, _ = read_lora_file(path)
    net_b.load_kohya(tensors)
    sd_c = net_b.to_kohya(torch.float32)
    assert all(torch.equal(v, sd_c[k]) for k, v in tensors.items())


def test_fresh_lora_is_a_no_op_and_scale_blends(tmp_path):
    bundle = make_bundle("sd2", te_naming="open_clip")
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))
    base_te, base_unet = _te_out(bundle, "te", tokens), _unet_out(bundle)
    net = inject_lora(bundle, net_cfg())
    # peft layers add an exact zero; the MHA wrapper takes torch's general attention path
    # instead of its fused one, which rounds differently in the last bits.
    assert torch.allclose(_te_out(bundle, "te", tokens), base_te, atol=1e-5)
    assert torch.equal(_unet_out(bundle), base_unet)
    randomize(net)
    full = _te_out(bundle, "te", tokens)
    assert (full - base_te).abs().max() > 1e-3
    net.set_scale(0.0)
    assert torch.equal(_te_out(bundle, "te", tokens), base_te)
    assert torch.equal(_unet_out(bundle), base_unet)
    net.set_scale(1.0)
    assert torch.equal(_te_out(bundle, "te", tokens), full)


def test_remove_restores_modules_weights_dtypes_and_flags():
    """As in a WebUI: fp16 weights with requires_grad=True; after remove() all is as before."""
    bundle = make_bundle("sd2", te_naming="open_clip")
    for root in bundle.trainable_roots().values():
        root.half().requires_grad_(True)
    before = {k: snapshot(m) for k, m in bundle.trainable_roots().items()}
    net = inject_lora(bundle, net_cfg())
    lora = net.parameters()
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    lora_ids = {id(p) for p in lora}
    for root in bundle.trainable_roots().values():
        assert not any(p.requires_grad for p in root.parameters() if id(p) not in lora_ids)
    randomize(net)
    net.remove()
    net.remove()  # idempotent
    after = {k: snapshot(m) for k, m in bundle.trainable_roots().items()}
    assert all(same_snapshot(before[k], after[k]) for k in before)


def test_mha_forward_and_remove_leave_base_weights_bit_exact():
    bundle = make_bundle("sd2", te_naming="open_clip")
    te = bundle.trainable_roots()["te"]
    before = snapshot(te)
    net = inject_lora(bundle, net_cfg(train_unet=False))
    randomize(net)
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        te(tokens).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    net.remove()
    assert same_snapshot(before, snapshot(te))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_wrapper_equals_merged_weights(batch_first):
    torch.manual_seed(0)
    base = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    wrapped = LoraMultiheadAttention(base, {"q": 2, "v": 3, "out": 2}, {"q": 1.0, "v": 1.5, "out": 4.0})
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.dtype == torch.float32 and p.requires_grad:
                p.normal_()
    merged = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    merged.load_state_dict(base.state_dict())
    with torch.no_grad():
        d = {p: wrapped.delta(p) for p in ("q", "v", "out")}
        merged.in_proj_weight[:16] += d["q"]
        merged.in_proj_weight[32:] += d["v"]
        merged.out_proj.weight += d["out"]
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # 3 sequences of 5 tokens
    mask = torch.triu(torch.full((5, 5), float("-inf")), 1)
    got = wrapped(x, x, x, need_weights=False, attn_mask=mask)[0]
    want = merged(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert wrapped.batch_first == batch_first and wrapped.embed_dim == 16


def test_injecting_twice_is_refused():
    bundle = make_bundle("sd2", te_naming="open_clip")
    net = inject_lora(bundle, net_cfg())
    with pytest.raises(HostError, match="already has LoRA layers"):
        inject_lora(bundle, net_cfg())
    net.remove()
    inject_lora(bundle, net_cfg()).remove()


def test_param_groups_and_roots():
    bundle = make_bundle("sdxl")
    net = inject_lora(bundle, net_cfg())
    groups = net.param_groups(1e-4, 5e-5)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert len(groups[1]["params"]) == len(net.parameters("te1")) + len(net.parameters("te2"))
    assert sum(len(g["params"]) for g in groups) == len(net.parameters()) == 2 * len(net.layout)
    unet_only = inject_lora(make_bundle("sd1"), net_cfg(train_text_encoder=False))
    assert all(k.startswith("lora_unet_") for k in unet_only.layout)
    assert [g["name"] for g in unet_only.param_groups(1.0, 2.0)] == ["unet"]



def test_loraplus_puts_each_parts_up_matrices_in_a_group_of_their_own():
    """LoRA+ (optim.loraplus_lr_ratio): the lora_up weights of the UNet and of the text encoders
    learn at ratio times their part's rate, everything else (lora_down, DoRA's magnitude) at it;
    the parameters are the same ones in the same order as without."""
    net = inject_lora(make_bundle("sdxl"), net_cfg())
    plain, plus = net.param_groups(1e-4, 5e-5), net.param_groups(1e-4, 5e-5, up_ratio=16.0)
    assert [(g["name"], g["lr"]) for g in plus] == [("unet", 1e-4), ("unet_lora_up", 1.6e-3),
                                                   ("text_encoder", 5e-5), ("text_encoder_lora_up", 8e-4)]
    ups = {id(p) for key in net.layout for name, p in net.tensors(key).items() if name.startswith("lora_up")}
    assert all(id(p) in ups for g in plus if g["name"].endswith("lora_up") for p in g["params"])
    assert not any(id(p) in ups for g in plus if not g["name"].endswith("lora_up") for p in g["params"])
    assert sorted(id(p) for g in plus for p in g["params"]) == sorted(id(p) for g in plain for p in g["params"])
    dora = inject_lora(make_bundle("sd1"), net_cfg(type="dora", train_text_encoder=False))
    [rest, up] = dora.param_groups(1.0, 1.0, up_ratio=4.0)
    assert up["lr"] == 4.0 and len(up["params"]) == len(dora.layout) and len(rest["params"]) == 2 * len(dora.layout)


def test_state_dict_round_trip_and_strict_load():
    net = inject_lora(make_bundle("sd1"), net_cfg())
    randomize(net)
    state = net.state_dict()
    other = inject_lora(make_bundle("sd1"), net_cfg())
    other.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    with pytest.raises(LoraFormatError, match="lora_unet_foo"):
        other.load_kohya({**state, "lora_unet_foo.alpha": torch.tensor(1.0),
                          "lora_unet_foo.lora_down.weight": torch.zeros(4, 2),
                          "lora_unet_foo.lora_up.weight": torch.zeros(2, 4)})
    with pytest.raises(LoraFormatError, match=key):
        other.load_kohya({k: v for k, v in state.items() if not k.startswith(key + ".")})
    wrong = dict(state)
    wrong[f"{key}.lora_down.weight"] = torch.zeros(8, 32)
    wrong[f"{key}.lora_up.weight"] = torch.zeros(32, 8)
    with pytest.raises(LoraFormatError, match=key):
        other.load_kohya(wrong)


def test_init_from_uses_the_files_ranks_and_alphas(tmp_path):
    bundle = make_bundle("sd1")
    src = inject_lora(bundle, net_cfg(rank=8, alpha=2.0, train_text_encoder=False))
    randomize(src)
    tensors = src.to_kohya(torch.float32)
    src.remove()
    odd = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
    tensors[f"{odd}.lora_down.weight"] = torch.randn(2, 32)
    tensors[f"{odd}.lora_up.weight"] = torch.randn(128, 2)
    tensors[f"{odd}.alpha"] = torch.tensor(0.5)
    path = save_lora_file(tmp_path / "a.safetensors", tensors, {})
    net = inject_lora(bundle, net_cfg(rank=4, alpha=1.0, init_from=str(path)))
    key = next(iter(net.layout))
    assert net.alpha(key) == 2.0 and net.parameters()[0].shape[0] == 8
    assert net.alpha(odd) == 0.5 and (net.network_dim, net.network_alpha) == (8, 2.0)
    assert all(k.startswith("lora_unet_") for k in net.layout)
    back = net.to_kohya(torch.float32)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(LoraFormatError, match="lora_unet_down_blocks_0_attentions_0"):
        inject_lora(make_bundle("sdxl"), net_cfg(init_from=str(path)))


def test_half_precision_base_trains_fp32_lora():
    """WebUI models run in fp16/bf16: forward keeps the base dtype, LoRA gradients are fp32."""
    bundle = make_bundle("sd2", te_naming="open_clip")
    for root in bundle.trainable_roots().values():
        root.to(torch.bfloat16)
    net = inject_lora(bundle, net_cfg())
    randomize(net)
    out = bundle.trainable_roots()["te"](torch.randint(0, 49408, (2, 77)))
    assert out.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    sample = bundle.unet(torch.randn(1, 4, 8, 8, generator=g).bfloat16(), torch.tensor([10]),
                         torch.randn(1, 5, 32, generator=g).bfloat16()).sample
    assert sample.dtype == torch.bfloat16
    (out.float().sum() + sample.float().sum()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())


def test_remove_keeps_attributes_the_model_gained_while_injected():
    """transformers marks a text encoder the first time it returns hidden states; removing the
    LoRA must not delete that mark, or the hooks are installed twice and hidden_states doubles."""
    bundle = make_bundle("sd1")
    te = bundle.text_encoders[0].module
    tokens = torch.tensor([[49406, 320, 1125, 49407]])
    net = inject_lora(bundle, net_cfg())
    first = te(tokens, output_hidden_states=True).hidden_states  # first run happens while injected
    net.remove()
    again = te(tokens, output_hidden_states=True).hidden_states
    assert len(again) == len(first) == te.config.num_hidden_layers + 1


@pytest.mark.parametrize("typ", ["lora", "locon"])
def test_max_norm_scales_back_the_modules_whose_update_is_too_large(typ: str):
    """kohya's scale_weight_norms: every module whose update (up @ down * alpha / rank) has a
    norm above the limit is brought to it, up and down scaled alike; the others are left
    exactly as they were; the counts come back as tensors."""
    net = inject_lora(make_bundle("sd1"), net_cfg(type=typ, conv_rank=2 if typ == "locon" else None))
    randomize(net, std=0.2)

    def norms() -> dict[str, float]:
        out = {}
        for key in net.layout:
            t = net.tensors(key)
            delta = t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)
            out[key] = float(delta.norm()) * net.alpha(key) / net.rank(key)
        return out

    before = norms()
    limit = sorted(before.values())[len(before) // 2]  # about half the modules are above it
    kept = {k: {n: p.detach().clone() for n, p in net.tensors(k).items()} for k, v in before.items() if v <= limit}
    scaled, largest = net.apply_max_norm(limit)
    after = norms()
    assert int(scaled) == sum(v > limit for v in before.values()) > 0
    assert float(largest) == pytest.approx(limit) and max(after.values()) == pytest.approx(limit, rel=1e-5)
    assert all(after[k] == pytest.approx(limit, rel=1e-5) for k, v in before.items() if v > limit)
    assert all(torch.equal(p, kept[k][n]) for k in kept for n, p in net.tensors(k).items())
    if typ == "locon":
        assert any(net.tensors(k)["lora_down.weight"].dim() == 4 for k in net.layout)  # the 3x3 convs too
