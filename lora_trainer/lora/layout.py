"""The layer shapes of a model family, by kohya key: what a LoRA file's tensors must fit.

Built from the config folders shipped in the package (full size), the tiny test model's or the
embedded demo model's configs, on PyTorch's ``meta`` device: no weights, no memory. ``inspect`` compares each module's
tensors with the layer of that name, which catches files whose names are right but whose
tensors belong elsewhere (q and k swapped in layers of different widths, conv1 and conv2
swapped in a ResNet block that changes the channel count).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from lora_trainer.families import Family, get_family
from lora_trainer.lora.kohya import PREFIXES
from lora_trainer.lora.kohya_tensors import ModuleTensors


def _roots(family: Family, size: str) -> dict[str, tuple[nn.Module, str]]:
    """A UNet family's LoRA roots on the meta device: UNet and CLIP text encoder(s)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        if size == "demo":  # the embedded demo model (SD1's topology): its configs are in its file
            unet, te = _demo_roots()
            tes = [(family.text_encoder_folders[0][0], te)]
        elif size == "tiny":
            unet = UNet2DConditionModel.from_config(family.tiny_unet_config())
        else:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(_config_folder(family) / "unet"))
    if size != "demo":
        tes = meta_text_encoders(family, size)
    return {"unet": (unet, "diffusers"), **{k: (te, "hf_clip") for k, te in tes}}


def _config_folder(family: Family) -> Path:
    import lora_trainer.models

    return Path(lora_trainer.models.__file__).parent / "configs" / family.config_folder_name("epsilon")


def meta_text_encoders(family: Family, size: str = "full") -> list[tuple[str, nn.Module]]:
    """(kohya key, Hugging Face CLIP model) of each of a UNet family's text encoders on the meta
    device, full-size (the packaged configs) or the tiny test model's (``size`` "tiny")."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models import tiny

    folder = _config_folder(family)
    with torch.device("meta"):
        if size == "tiny":
            return [(key, CLIPTextModel(CLIPTextConfig(**tiny.text_config()))) for key, _, _ in
                    family.text_encoder_folders]
        return [(key, CLIPTextModel(CLIPTextConfig.from_pretrained(folder / sub)))
                for key, sub, _ in family.text_encoder_folders]


def _demo_roots() -> tuple[nn.Module, nn.Module]:
    """The demo model's UNet and text encoder from the configs in its file's header (call on the
    meta device: no weights are read)."""
    import json

    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models import demo_base

    with safe_open(str(demo_base.WEIGHTS_PATH), "pt") as f:
        meta = f.metadata() or {}
    unet = UNet2DConditionModel.from_config(json.loads(meta["unet_config"]))
    return unet, CLIPTextModel(CLIPTextConfig(**json.loads(meta["text_config"])))


def sizes_of(arch: str) -> tuple[str, ...]:
    """The layouts a file of ``arch`` may fit: the full-size model, the tiny test model, and for
    SD1 the embedded demo model."""
    from lora_trainer.models import demo_base

    return ("full", "tiny", "demo") if arch == demo_base.FAMILY else ("full", "tiny")


@functools.cache
def family_shapes(arch: str, size: str = "full") -> dict[str, tuple[int, ...]]:
    """{kohya module key: weight shape} of every Linear/Conv2d with a kohya name in ``arch``'s
    UNet and text encoder(s); ``size`` "full" (the real models), "tiny" (the tiny test model) or
    "demo" (the embedded demo model, SD1).
    A family that names its keys itself gives its own (:meth:`Family.lora_shapes`). A family with
    one text encoder also answers to the other prefixes the loaders read for it (SD1: ``lora_te1_``)."""
    from lora_trainer.lora.inject import _candidate_layout

    family = get_family(arch)
    own = family.lora_shapes(size)
    if own is not None:
        return own
    roots = _roots(family, size)
    shapes = {k: tuple(roots[s.root][0].get_submodule(s.path).weight.shape)
              for k, s in _candidate_layout(arch, roots).items()}
    if family.text_encoder_roots == ("te",):
        written = PREFIXES["te"]
        for alias in (p for p in family.lora_te_prefixes if p != written):
            shapes.update({alias + k[len(written):]: v for k, v in list(shapes.items()) if k.startswith(written)})
    return shapes


def implied_shape(m: ModuleTensors) -> tuple[int, int] | None:
    """(out, in · kernel) of the weight a module's tensors update; None when they do not say."""
    t = m.tensors

    def flat(x: torch.Tensor) -> int:
        return int(x.numel() // max(1, x.shape[0]))

    if m.kind in ("lora", "dora"):
        return int(t["lora_up.weight"].shape[0]), flat(t["lora_down.weight"])
    if m.kind == "loha":
        return int(t["hada_w1_a"].shape[0]), flat(t["hada_w1_b"])
    if m.kind == "lokr":
        a, c = ((t["lokr_w1"].shape[0], t["lokr_w1"].shape[1]) if "lokr_w1" in t
                else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        b, d = ((t["lokr_w2"].shape[0], flat(t["lokr_w2"])) if "lokr_w2" in t
                else (t["lokr_w2_a"].shape[0], flat(t["lokr_w2_b"])))
        return int(a * b), int(c * d)
    return None


def shape_problem(m: ModuleTensors, weight: tuple[int, ...]) -> str | None:
    """Why module ``m`` does not fit a layer whose weight has shape ``weight`` (None if it fits)."""
    want = (weight[0], int(torch.Size(weight[1:]).numel()))
    got = implied_shape(m)
    if got is not None and got != want:
        return f"updates a ({got[0]}, {got[1]}) weight, the layer's is {tuple(weight)}"
    scale = m.tensors.get("dora_scale")
    if scale is not None and scale.numel() not in (weight[0], weight[1]):
        return f"dora_scale has {scale.numel()} values, the layer has {weight[1]} inputs and {weight[0]} outputs"
    return None
