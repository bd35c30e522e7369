"""Tiny models for the LoRA tests: diffusers parts, an open_clip text tower, the WebUI's LDM UNet."""

from __future__ import annotations

import torch
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.lora.inject import LoraNetwork
from lora_trainer.models.bundle import ModelBundle, TextEncoderPart
from lora_trainer.models.tiny import build_components


def open_clip_text(seed: int = 0) -> nn.Module:
    """A tiny open_clip text transformer (module names as in A1111's SD2 TE / SDXL te2)."""
    from open_clip.transformer import TextTransformer

    torch.manual_seed(seed)
    return TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=2,
                           output_dim=32).eval().requires_grad_(False)


def ldm_unet(arch: str = "sd1", seed: int = 0) -> nn.Module:
    """The WebUI's own UNet class with the tiny diffusers model's topology and widths."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(seed)
    if arch == "sdxl":
        kw = dict(channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_head_channels=16,
                  context_dim=64, use_linear_in_transformer=True)
    else:
        kw = dict(channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1), num_heads=8, context_dim=32,
                  use_linear_in_transformer=arch == "sd2")
    return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                     use_spatial_transformer=True, transformer_depth=1, legacy=False, **kw).eval()


def _nothing(*_a: object, **_k: object) -> None:
    raise NotImplementedError("not used by the LoRA tests")


def make_bundle(arch: str, parts: dict | None = None, *, te_naming: str = "hf_clip",
                unet: nn.Module | None = None, unet_naming: str = "diffusers") -> ModelBundle:
    """A bundle of tiny modules (only the trainable roots matter to the LoRA code)."""
    parts = parts or build_components(arch)
    if arch == "sdxl":
        tes = [TextEncoderPart("te1", parts["text_encoder"], "hf_clip"),
               TextEncoderPart("te2", open_clip_text() if te_naming == "open_clip" else parts["text_encoder_2"],
                               te_naming)]
    else:
        te = open_clip_text() if te_naming == "open_clip" else parts["text_encoder"]
        tes = [TextEncoderPart("te", te, te_naming)]
    return ModelBundle(arch=arch, prediction_type="epsilon", unet=unet if unet is not None else parts["unet"],
                       unet_naming=unet_naming, text_encoders=tes, vae=None, alphas_cumprod=torch.ones(1000),
                       encode_images=_nothing, encode_text=_nothing, predict=_nothing, name=f"tiny-{arch}")


def net_cfg(**kw: object) -> NetworkConfig:
    base = dict(rank=4, alpha=1.5, train_unet=True, train_text_encoder=True)
    base.update(kw)
    return NetworkConfig(**base)


def randomize(net: LoraNetwork, seed: int = 1, std: float = 0.05) -> None:
    """Non-zero LoRA weights (a fresh LoRA's up is zero, which would hide mapping bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for root in {s.root for s in net.layout.values()}:
            for p in net.parameters(root):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(module: nn.Module) -> dict:
    """Identity and content of every submodule and parameter, for exact-restore checks."""
    return {
        "modules": {n: id(m) for n, m in module.named_modules()},
        "params": {n: (id(p), p.dtype, p.requires_grad, p.detach().clone()) for n, p in module.named_parameters()},
        "attrs": set(vars(module)),
    }


def same_snapshot(a: dict, b: dict) -> bool:
    if a["modules"] != b["modules"] or a["attrs"] != b["attrs"] or a["params"].keys() != b["params"].keys():
        return False
    return all(x[:3] == y[:3] and torch.equal(x[3], y[3]) for x, y in zip(a["params"].values(), b["params"].values(), strict=True))
