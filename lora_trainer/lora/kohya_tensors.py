"""The per-module tensors of a kohya/LyCORIS LoRA file, for every family: which tensors one module
has per kind (LoRA, DoRA, LoHa, LoKr), reading and writing them, and the text encoders' HF CLIP
paths. Pure functions of names and tensors; no family knowledge (the families' own file naming
uses these, so this module must not ask the families).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_trainer.errors import LoraFormatError

# What every module key of a file starts with: the denoiser, then the text encoders (one; or
# CLIP-L/CLIP-G/T5 as te1/te2/te3 in SDXL, Flux.1 and SD3.5 files).
FILE_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
# --- text encoders -------------------------------------------------------------------------
_HF_RE = re.compile(r"^(?:.*\.)?(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)$")


_OPEN_CLIP_RE = re.compile(r"^(?:.*\.)?resblocks\.(\d+)\.(.+)$")


# open_clip child (and MHA part) -> HF CLIP child
OPEN_CLIP_CHILDREN = {"attn:q": "self_attn.q_proj", "attn:k": "self_attn.k_proj", "attn:v": "self_attn.v_proj",
                      "attn:out": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


MHA_PARTS = ("q", "k", "v", "out")


def te_hf_path(path: str, naming: str, part: str = "") -> str:
    """Text-encoder module path (+ MHA part) -> HF CLIP path ``text_model.encoder.layers.N.<child>``."""
    if naming == "open_clip":
        m = _OPEN_CLIP_RE.match(path)
        child = OPEN_CLIP_CHILDREN.get(f"{m.group(2)}:{part}" if m and part else (m.group(2) if m else ""))
        if m is None or child is None:
            raise LoraFormatError(f"open_clip module {path!r} (part {part!r}) has no kohya name")
        return f"text_model.encoder.layers.{m.group(1)}.{child}"
    m = _HF_RE.match(path)
    if m is None or part:
        raise LoraFormatError(f"text-encoder module {path!r} has no kohya name (expected encoder.layers.N...)")
    return f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}"


def _group_by_module(tensors: dict[str, torch.Tensor],
                     split: Callable[[str], tuple[str, str]]) -> dict[str, dict[str, torch.Tensor]]:
    """{module key: {tensor name: tensor}}; every module key must carry a known prefix."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, suffix = split(key)
        if not module.startswith(FILE_PREFIXES):
            raise LoraFormatError(f"LoRA key {key!r} does not start with {', '.join(FILE_PREFIXES)}")
        groups.setdefault(module, {})[suffix] = tensor
    return groups


# --- LyCORIS variants ----------------------------------------------------------------------
# The tensors one module has in the file, per kind (the names A1111's network_lora/network_hada/
# network_lokr, Forge's and ComfyUI's loaders read): (required, optional). DoRA is LoRA plus a
# ``dora_scale``; a LoKr factor is either whole (lokr_w1) or a low-rank pair (lokr_w1_a/_b).
KIND_TENSORS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "lora": (("lora_down.weight", "lora_up.weight"), ()),
    "dora": (("lora_down.weight", "lora_up.weight", "dora_scale"), ()),
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), ()),
    "lokr": ((), ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")),
}


# network.type -> the kind of every module of that network (LoCon is LoRA on more layers).
TYPE_KIND = {"lora": "lora", "locon": "lora", "dora": "dora", "loha": "loha", "lokr": "lokr"}


ALL_SUFFIXES = tuple(sorted({s for req, opt in KIND_TENSORS.values() for s in (*req, *opt)} | {"alpha"},
                            key=len, reverse=True))


@dataclass
class ModuleTensors:
    """One module of any kind as in the file: its tensors (without alpha) and alpha."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float

    @property
    def rank(self) -> int | None:
        return rank_of_tensors(self.tensors)


def rank_of_tensors(tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank loaders divide alpha by: the inner size of lora_down, hada_w1_b or the LoKr pair
    (lokr_w2_b before lokr_w1_b, as A1111 and ComfyUI take it); None for a LoKr with two whole
    factors (scale 1)."""
    for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if name in tensors:
            return int(tensors[name].shape[0])
    return None


def split_any_key(key: str) -> tuple[str, str]:
    """``lora_unet_x.hada_w1_a`` -> (``lora_unet_x``, ``hada_w1_a``) for every known tensor name."""
    for suffix in ALL_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise LoraFormatError(f"LoRA tensor {key!r} is not a LoRA/DoRA/LoHa/LoKr tensor "
                          f"(expected <module>.{'/'.join(sorted(ALL_SUFFIXES))})")


def module_kind(module: str, names: set[str]) -> str:
    """The kind of a module from the names of its tensors; error naming what is missing or mixed."""
    for kind, (req, opt) in KIND_TENSORS.items():
        allowed = set(req) | set(opt) | {"alpha"}
        if names <= allowed and set(req) <= names:
            if kind == "lokr":
                for f in ("lokr_w1", "lokr_w2"):
                    if (f in names) == ({f + "_a", f + "_b"} <= names) or ((f + "_a" in names) != (f + "_b" in names)):
                        raise LoraFormatError(f"LoKr module {module!r} needs either {f} or both {f}_a and {f}_b")
            return kind
    raise LoraFormatError(f"LoRA module {module!r} has tensors {sorted(names)}, which are no complete "
                          "LoRA (lora_down/lora_up), DoRA (+dora_scale), LoHa (hada_w1_a...) or LoKr (lokr_w1...) set")


def read_modules(tensors: dict[str, torch.Tensor]) -> dict[str, ModuleTensors]:
    """Flat file tensors of any kind -> {module key: ModuleTensors}; strict, input untouched."""
    groups = _group_by_module(tensors, split_any_key)
    out: dict[str, ModuleTensors] = {}
    for module, g in groups.items():
        kind = module_kind(module, set(g))
        if "alpha" not in g:
            raise LoraFormatError(f"LoRA module {module!r} has no alpha tensor")
        if g["alpha"].numel() != 1:
            raise LoraFormatError(f"LoRA module {module!r}: alpha must be a scalar, got shape {tuple(g['alpha'].shape)}")
        out[module] = ModuleTensors(kind, {k: v for k, v in g.items() if k != "alpha"}, float(g["alpha"].item()))
    return out


def write_modules(modules: dict[str, ModuleTensors], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """{module key: ModuleTensors} -> flat file tensors (new contiguous CPU tensors in ``dtype``;
    alpha float32, as in :func:`to_kohya_tensors`)."""
    out: dict[str, torch.Tensor] = {}
    for key, m in modules.items():
        for name, t in m.tensors.items():
            out[f"{key}.{name}"] = t.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out
