"""The kohya LoRA format as data: module path <-> file key tables, both directions.

Key conventions (what A1111, Forge, ComfyUI and diffusers read):

* SD1/SD2 UNet: ``lora_unet_`` + diffusers module path with dots as underscores
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).
* SDXL UNet: ``lora_unet_`` + SGM/LDM path (``lora_unet_input_blocks_4_1_transformer_blocks_0_...``).
* Text encoders: ``lora_te_`` (SD1/SD2) or ``lora_te1_``/``lora_te2_`` (SDXL) + the HF CLIP path
  ``text_model_encoder_layers_N_self_attn_q_proj`` / ``..._mlp_fc1``; open_clip modules
  (``resblocks.N.attn`` q/k/v/out, ``mlp.c_fc``/``c_proj``) are written under the HF names.
* Tensors per module: ``<key>.lora_down.weight``, ``<key>.lora_up.weight``, ``<key>.alpha``
  (the real alpha as a scalar float; scale = alpha / rank). 1x1 conv weights stay 4-D.

Everything here is pure: functions of names and tensors that never modify their inputs, raise
:class:`LoraFormatError` naming the unknown key, and derive each inverse from the same table.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from lora_trainer.errors import LoraFormatError
from lora_trainer.families import Family, all_families, family_names, get_family
from lora_trainer.lora.kohya_tensors import (
    MHA_PARTS,
    _group_by_module,
    te_hf_path,
)

PREFIXES = {"unet": "lora_unet_", "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_"}
TENSOR_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")

# Every level of a kohya-named UNet family has 2 res blocks (SD1/SD2/SDXL); the family's
# ``unet_topology`` gives the levels and which have attention, ``kohya_unet_naming`` the naming.
LAYERS_PER_BLOCK = 2

# diffusers ResnetBlock2D child -> LDM ResBlock child.
RESNET_CHILDREN = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_CHILDREN_INV = {v: k for k, v in RESNET_CHILDREN.items()}


def unet_family(arch: str) -> Family:
    """The family ``arch``, when its LoRA files use kohya's UNet tables; else LoraFormatError."""
    if arch in family_names() and get_family(arch).unet_topology is not None:
        return get_family(arch)
    names = sorted(f.name for f in all_families() if f.unet_topology is not None)
    raise LoraFormatError(f"unknown architecture {arch!r} (expected {', '.join(names[:-1])} or {names[-1]})")


@functools.cache
def unet_block_table(arch: str) -> dict[str, tuple[str, str]]:
    """{diffusers prefix: (LDM prefix, kind)} for the UNet of ``arch``; kind is "resnet" (children
    renamed by RESNET_CHILDREN), "attn" (spatial transformer, children keep their names) or
    "same" (single layers: samplers, embeddings, conv in/out).

    Computed from the topology: input block index = 1 + 3*level + i, output = 3*up_level + i.
    """
    levels, attn = unet_family(arch).unet_topology or (0, ())
    n = LAYERS_PER_BLOCK
    t: dict[str, tuple[str, str]] = {
        "conv_in": ("input_blocks.0.0", "same"), "time_embedding.linear_1": ("time_embed.0", "same"),
        "time_embedding.linear_2": ("time_embed.2", "same"), "conv_norm_out": ("out.0", "same"),
        "conv_out": ("out.2", "same"), "add_embedding.linear_1": ("label_emb.0.0", "same"),
        "add_embedding.linear_2": ("label_emb.0.2", "same"),
        "mid_block.resnets.0": ("middle_block.0", "resnet"), "mid_block.attentions.0": ("middle_block.1", "attn"),
        "mid_block.resnets.1": ("middle_block.2", "resnet"),
    }
    for b in range(levels):
        for i in range(n):
            t[f"down_blocks.{b}.resnets.{i}"] = (f"input_blocks.{1 + (n + 1) * b + i}.0", "resnet")
            if b in attn:
                t[f"down_blocks.{b}.attentions.{i}"] = (f"input_blocks.{1 + (n + 1) * b + i}.1", "attn")
        if b < levels - 1:
            t[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{(n + 1) * (b + 1)}.0.op", "same")
    for u in range(levels):
        has_attn = (levels - 1 - u) in attn
        for i in range(n + 1):
            t[f"up_blocks.{u}.resnets.{i}"] = (f"output_blocks.{(n + 1) * u + i}.0", "resnet")
            if has_attn:
                t[f"up_blocks.{u}.attentions.{i}"] = (f"output_blocks.{(n + 1) * u + i}.1", "attn")
        if u < levels - 1:
            t[f"up_blocks.{u}.upsamplers.0.conv"] = (f"output_blocks.{(n + 1) * u + n}.{2 if has_attn else 1}.conv", "same")
    return t


@functools.cache
def _inverse_block_table(arch: str) -> dict[str, tuple[str, str]]:
    return {ldm: (dif, kind) for dif, (ldm, kind) in unet_block_table(arch).items()}


def _convert(path: str, table: dict[str, tuple[str, str]], children: dict[str, str], what: str) -> str:
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        head, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if head in table:
            new_head, kind = table[head]
            if kind == "resnet" and rest:
                child = next((c for c in children if rest == c or rest.startswith(c + ".")), None)
                if child is None:
                    break
                rest = children[child] + rest[len(child):]
            return f"{new_head}.{rest}" if rest else new_head
    raise LoraFormatError(f"UNet module {path!r} has no {what} equivalent; target only modules of the UNet blocks")


def diffusers_to_ldm(path: str, arch: str) -> str:
    """diffusers UNet module path -> LDM/SGM path (``down_blocks.1.attentions.0.proj_in`` ->
    ``input_blocks.4.1.proj_in``)."""
    return _convert(path, unet_block_table(arch), RESNET_CHILDREN, "LDM")


def ldm_to_diffusers(path: str, arch: str) -> str:
    """LDM/SGM UNet module path -> diffusers path; the inverse of :func:`diffusers_to_ldm`."""
    return _convert(path, _inverse_block_table(arch), _RESNET_CHILDREN_INV, "diffusers")






def module_parts(naming: str, is_mha: bool) -> tuple[str, ...]:
    """The separately adapted parts of one module: ("",) for Linear/Conv, q/k/v/out for MHA."""
    return MHA_PARTS if is_mha else ("",)


def kohya_name(arch: str, root: str, naming: str, path: str, part: str = "") -> str:
    """File key (without tensor suffix) of module ``path`` in ``root`` (``unet``, ``te``, ``te1``, ``te2``)."""
    own = _family_key(arch, root, naming, path, part)
    if own is not None:
        return own
    if root not in PREFIXES:
        raise LoraFormatError(f"unknown LoRA root {root!r} (expected unet, te, te1 or te2)")
    if root == "unet":
        want = unet_family(arch).kohya_unet_naming
        if naming != want:
            path = diffusers_to_ldm(path, arch) if want == "ldm" else ldm_to_diffusers(path, arch)
    else:
        path = te_hf_path(path, naming, part)
    return PREFIXES[root] + path.replace(".", "_")


def _family_key(arch: str, root: str, naming: str, path: str, part: str) -> str | None:
    """A family's own file naming (transformer families), or None for the SD naming below."""
    if arch not in family_names():
        return None
    return get_family(arch).lora_key(root, naming, path, part)


@dataclass(frozen=True)
class Slot:
    """Where one kohya module lives in the model: root key, module path, MHA part ("" if none)."""

    root: str
    path: str
    part: str = ""


def build_layout(arch: str, targets: dict[str, tuple[str, list[tuple[str, tuple[str, ...]]]]]) -> dict[str, Slot]:
    """{kohya key: Slot} for ``targets`` = {root: (naming, [(module path, parts), ...])}; parts is
    ("",) for a Linear/Conv2d and a subset of MHA_PARTS for an nn.MultiheadAttention.

    The inverse table (file key -> module) is derived from the forward naming function, so
    both directions agree by construction; two modules with one key is an error.
    """
    layout: dict[str, Slot] = {}
    for root, (naming, paths) in targets.items():
        for path, parts in paths:
            for part in parts:
                key = kohya_name(arch, root, naming, path, part)
                if key in layout:
                    raise LoraFormatError(f"two modules map to the LoRA key {key!r}: {layout[key]} and {path!r}")
                layout[key] = Slot(root, path, part)
    return layout


# --- tensors -------------------------------------------------------------------------------
@dataclass
class LoraWeights:
    """One module's LoRA: down (r, in[, 1, 1]), up (out, r[, 1, 1]) and the real alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def split_in_proj(w: LoraWeights) -> dict[str, LoraWeights]:
    """A LoRA on a combined q/k/v ``in_proj`` (up of shape (3E, r)) -> three kohya LoRAs for
    q, k and v sharing the down matrix. Exact: each delta is one third of the stacked delta."""
    if w.up.shape[0] % 3:
        raise LoraFormatError(f"in_proj LoRA up has {w.up.shape[0]} rows, not a multiple of 3")
    return {p: LoraWeights(w.down.clone(), up.clone(), w.alpha) for p, up in zip("qkv", w.up.chunk(3), strict=True)}


def stack_qkv(parts: dict[str, LoraWeights]) -> LoraWeights:
    """Three kohya LoRAs (q, k, v) -> one LoRA on the combined ``in_proj``.

    The downs are stacked to rank r_q + r_k + r_v and the ups placed block-diagonally, so the
    delta is exact; each part's alpha / rank is folded into its up block and the result has
    alpha = rank (scale 1). A missing part contributes a zero block.
    """
    present = [parts[p] for p in "qkv" if p in parts]
    if not present:
        raise LoraFormatError("stack_qkv needs at least one of q, k, v")
    e = present[0].up.shape[0]
    ranks = [parts[p].rank if p in parts else 0 for p in "qkv"]
    total = sum(ranks)
    down = torch.cat([parts[p].down for p in "qkv" if p in parts])
    up = present[0].up.new_zeros(3 * e, total)
    col = 0
    for i, p in enumerate("qkv"):
        if p in parts:
            w = parts[p]
            up[i * e:(i + 1) * e, col:col + w.rank] = w.up * (w.alpha / w.rank)
            col += w.rank
    return LoraWeights(down, up, float(total))


def to_kohya_tensors(weights: dict[str, LoraWeights], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """{kohya key: LoraWeights} -> flat file tensors (new contiguous tensors in ``dtype``).

    Alpha stays float32 whatever ``dtype``: loaders read it with ``.item()``, and an fp16 alpha
    such as 0.1 would change the strength slightly."""
    out: dict[str, torch.Tensor] = {}
    for key, w in weights.items():
        out[f"{key}.lora_down.weight"] = w.down.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = w.up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    return out


def split_key(key: str) -> tuple[str, str]:
    """``lora_unet_x.lora_down.weight`` -> (``lora_unet_x``, ``lora_down.weight``); unknown -> error."""
    for suffix in TENSOR_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    raise LoraFormatError(f"LoRA tensor {key!r} is not <module>.lora_down.weight, .lora_up.weight or .alpha")




def from_kohya_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, LoraWeights]:
    """Flat file tensors -> {kohya key: LoraWeights}; strict: every module needs down, up and alpha
    with matching ranks. The caller's dict and tensors are left untouched."""
    groups = _group_by_module(tensors, split_key)
    out: dict[str, LoraWeights] = {}
    for module, g in groups.items():
        missing = [s for s in TENSOR_SUFFIXES if s not in g]
        if missing:
            raise LoraFormatError(f"LoRA module {module!r} has no {missing[0]} tensor")
        down, up = g["lora_down.weight"], g["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"LoRA module {module!r}: lora_up {tuple(up.shape)} does not fit lora_down {tuple(down.shape)}")
        if g["alpha"].numel() != 1:
            raise LoraFormatError(f"LoRA module {module!r}: alpha must be a scalar, got shape {tuple(g['alpha'].shape)}")
        out[module] = LoraWeights(down=down, up=up, alpha=float(g["alpha"].item()))
    return out


_ATTN_CHILD = r"(?:proj_in|proj_out|norm|transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2|norm[123]))"
_TE_CHILD = r"text_model_encoder_layers_\d+_(?:self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])"


@functools.cache
def _unet_key_regex(arch: str) -> re.Pattern[str]:
    alts = []
    for dif, (ldm, kind) in unet_block_table(arch).items():
        for prefix, children in ((dif, RESNET_CHILDREN), (ldm, _RESNET_CHILDREN_INV)):
            head = re.escape(prefix.replace(".", "_"))
            if kind == "attn":
                alts.append(f"{head}_{_ATTN_CHILD}")
            elif kind == "resnet":
                alts.append(f"{head}_(?:{'|'.join(re.escape(c.replace('.', '_')) for c in children)})")
            else:
                alts.append(head)
    return re.compile(f"lora_unet_(?:{'|'.join(alts)})")


def known_module_key(arch: str, key: str) -> bool:
    """Whether a module key (no tensor suffix) names a real module of an ``arch`` model. The family
    answers when it names its keys itself; else kohya's tables: the UNet in diffusers or LDM/SGM
    spelling (the WebUIs accept both), the text encoders under the prefixes the loaders read."""
    own = get_family(arch).known_lora_key(key)
    if own is not None:
        return own
    if key.startswith("lora_unet_"):
        return _unet_key_regex(arch).fullmatch(key) is not None
    prefixes = get_family(arch).lora_te_prefixes
    return any(key.startswith(p) and re.fullmatch(_TE_CHILD, key[len(p):]) for p in prefixes)














