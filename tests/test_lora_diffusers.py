"""Our kohya files load in diffusers with every key matched, at the trained strength."""

from __future__ import annotations

import logging

import pytest
import torch
from lora_fixtures import make_bundle, net_cfg, randomize

from lora_trainer.lora.files import save_lora_file
from lora_trainer.lora.inject import inject_lora
from lora_trainer.models.tiny import build_pipeline


def _outputs(pipe, arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 49408, (1, 77), generator=g)
    out = {"te": pipe.text_encoder(tokens).last_hidden_state}
    ctx = out["te"]
    kw = {}
    if arch == "sdxl":
        te2 = pipe.text_encoder_2(tokens, output_hidden_states=True)
        out["te2"] = te2.hidden_states[-2]
        ctx = torch.cat([out["te"], out["te2"]], dim=-1)
        kw["added_cond_kwargs"] = {"text_embeds": te2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    x = torch.randn(1, 4, 8, 8, generator=g)
    out["unet"] = pipe.unet(x, torch.tensor([500]), ctx, **kw).sample
    return {k: v.detach().clone() for k, v in out.items()}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_reads_our_file_at_full_and_zero_strength(arch, tmp_path, caplog):
    pipe = build_pipeline(arch)
    base = _outputs(pipe, arch)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if arch == "sdxl":
        parts["text_encoder_2"] = pipe.text_encoder_2
    bundle = make_bundle(arch, parts)
    net = inject_lora(bundle, net_cfg(rank=4, alpha=1.5))
    randomize(net, std=0.1)
    ours = _outputs(pipe, arch)
    assert all((ours[k] - base[k]).abs().max() > 1e-3 for k in ours)  # the LoRA does something everywhere
    n_modules = len(net.layout)
    save_lora_file(tmp_path / "ours.safetensors", net.to_kohya(torch.float32), {"ss_network_dim": "4"})
    net.remove()
    assert all(torch.equal(v, base[k]) for k, v in _outputs(pipe, arch).items())

    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(tmp_path), weight_name="ours.safetensors", adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage().lower()
                or "not" in r.getMessage().lower() and "found" in r.getMessage().lower()]
    # Every module of the file became a LoRA layer in diffusers (none dropped or unmatched).
    loaded = sum(1 for m in parts.values() for sub in m.modules() if "ours" in getattr(sub, "lora_A", {}))
    assert loaded == n_modules
    theirs = _outputs(pipe, arch)
    for k in ours:
        assert torch.allclose(theirs[k], ours[k], atol=1e-5, rtol=1e-4), k
    pipe.set_adapters(["ours"], adapter_weights=[0.0])
    zero = _outputs(pipe, arch)
    for k in base:
        assert torch.allclose(zero[k], base[k], atol=1e-6), k
