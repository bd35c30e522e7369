"""LoRA file keys of the transformer families (Flux.1, SD3.5): module path <-> file key, both ways.

The trainer adapts diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` (separate
``to_q``/``to_k``/``to_v``, ``add_*_proj``, ``proj_mlp``). The files use kohya's naming, the one
every loader of these families reads (read in their code; see docs/lora-format.md):

* transformer: ``lora_unet_`` + the original (BFL / MMDiT) module path with dots as underscores,
  ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``,
  ``lora_unet_joint_blocks_5_x_block_attn_qkv``. kohya's lora_flux/lora_sd3 write these;
  ComfyUI and Forge Neo map ``lora_unet_`` + every ``diffusion_model.*`` weight of their model
  (whole layers, nothing sliced); diffusers converts the Flux ones (``_convert_kohya_flux_lora_to_diffusers``).
* text encoders: ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G (SD3) or T5 (Flux), ``lora_te3_`` T5
  (SD3), + the HF path (``text_model_encoder_layers_0_self_attn_q_proj``).

Those original layers fuse what diffusers splits: ``qkv`` = [to_q; to_k; to_v] and Flux's
``linear1`` = [to_q; to_k; to_v; proj_mlp] (rows). One file module then holds several trained
modules, exactly: the downs are concatenated, the ups placed block-diagonally (kohya's own
``split_qkv`` layout), so ``up @ down`` is the stacked deltas. The final (and SD3's last
context) adaLN layer orders its two halves (shift, scale) where diffusers has (scale, shift):
its up rows are swapped.

Inside the trainer each module keeps a key of its own: the file key plus ``@`` and a part tag
(``lora_unet_double_blocks_0_img_attn_qkv@q``, ``..._linear1@mlp``, ``..._adaLN_modulation_1@ss``).
:func:`file_tensors` turns those modules into the file's tensors, :func:`module_tensors` back;
keys without a tag are the same in both.
"""

from __future__ import annotations

import functools
import re

import torch

from lora_trainer.errors import LoraFormatError
from lora_trainer.lora.kohya_tensors import ModuleTensors, read_modules, te_hf_path, write_modules

FAMILIES = ("flux1", "sd3")
_LABELS = {"flux1": "Flux.1", "sd3": "SD3.5"}
# LoRA root -> file prefix, per family (ComfyUI's model_lora_keys_clip: lora_te1_ = CLIP-L; with
# CLIP-G present lora_te2_ = CLIP-G and lora_te3_ = T5; Flux's T5 also as lora_te2_).
PREFIXES: dict[str, dict[str, str]] = {
    "flux1": {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"},
    "sd3": {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"},
}
# Roots that are T5 (HF T5EncoderModel paths), the others are CLIP.
_T5_ROOTS = {"flux1": "te2", "sd3": "te3"}

SEP = "@"
# The order of a fused layer's parts (rows of its weight).
FUSED_PARTS = {"qkv": ("q", "k", "v"), "linear1": ("q", "k", "v", "mlp")}
SWAP_TAG = "ss"

# (diffusers path, original path, part tag); {i} is a block index. A tag q/k/v/mlp names a row
# block of a fused layer, "ss" a (scale, shift) layer stored as (shift, scale).
_FLUX_TABLE: tuple[tuple[str, str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q", "double_blocks.{i}.img_attn.qkv", "q"),
    ("transformer_blocks.{i}.attn.to_k", "double_blocks.{i}.img_attn.qkv", "k"),
    ("transformer_blocks.{i}.attn.to_v", "double_blocks.{i}.img_attn.qkv", "v"),
    ("transformer_blocks.{i}.attn.add_q_proj", "double_blocks.{i}.txt_attn.qkv", "q"),
    ("transformer_blocks.{i}.attn.add_k_proj", "double_blocks.{i}.txt_attn.qkv", "k"),
    ("transformer_blocks.{i}.attn.add_v_proj", "double_blocks.{i}.txt_attn.qkv", "v"),
    ("transformer_blocks.{i}.attn.to_out.0", "double_blocks.{i}.img_attn.proj", ""),
    ("transformer_blocks.{i}.attn.to_add_out", "double_blocks.{i}.txt_attn.proj", ""),
    ("transformer_blocks.{i}.ff.net.0.proj", "double_blocks.{i}.img_mlp.0", ""),
    ("transformer_blocks.{i}.ff.net.2", "double_blocks.{i}.img_mlp.2", ""),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "double_blocks.{i}.txt_mlp.0", ""),
    ("transformer_blocks.{i}.ff_context.net.2", "double_blocks.{i}.txt_mlp.2", ""),
    ("transformer_blocks.{i}.norm1.linear", "double_blocks.{i}.img_mod.lin", ""),
    ("transformer_blocks.{i}.norm1_context.linear", "double_blocks.{i}.txt_mod.lin", ""),
    ("single_transformer_blocks.{i}.attn.to_q", "single_blocks.{i}.linear1", "q"),
    ("single_transformer_blocks.{i}.attn.to_k", "single_blocks.{i}.linear1", "k"),
    ("single_transformer_blocks.{i}.attn.to_v", "single_blocks.{i}.linear1", "v"),
    ("single_transformer_blocks.{i}.proj_mlp", "single_blocks.{i}.linear1", "mlp"),
    ("single_transformer_blocks.{i}.proj_out", "single_blocks.{i}.linear2", ""),
    ("single_transformer_blocks.{i}.norm.linear", "single_blocks.{i}.modulation.lin", ""),
    ("x_embedder", "img_in", ""),
    ("context_embedder", "txt_in", ""),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", ""),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", ""),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", ""),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", ""),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", ""),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", ""),
    ("proj_out", "final_layer.linear", ""),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", SWAP_TAG),
)

_SD3_TABLE: tuple[tuple[str, str, str], ...] = (
    ("transformer_blocks.{i}.attn.to_q", "joint_blocks.{i}.x_block.attn.qkv", "q"),
    ("transformer_blocks.{i}.attn.to_k", "joint_blocks.{i}.x_block.attn.qkv", "k"),
    ("transformer_blocks.{i}.attn.to_v", "joint_blocks.{i}.x_block.attn.qkv", "v"),
    ("transformer_blocks.{i}.attn.add_q_proj", "joint_blocks.{i}.context_block.attn.qkv", "q"),
    ("transformer_blocks.{i}.attn.add_k_proj", "joint_blocks.{i}.context_block.attn.qkv", "k"),
    ("transformer_blocks.{i}.attn.add_v_proj", "joint_blocks.{i}.context_block.attn.qkv", "v"),
    ("transformer_blocks.{i}.attn.to_out.0", "joint_blocks.{i}.x_block.attn.proj", ""),
    ("transformer_blocks.{i}.attn.to_add_out", "joint_blocks.{i}.context_block.attn.proj", ""),
    # SD3.5 medium (MMDiT-X): a second self-attention in the first blocks' x stream.
    ("transformer_blocks.{i}.attn2.to_q", "joint_blocks.{i}.x_block.attn2.qkv", "q"),
    ("transformer_blocks.{i}.attn2.to_k", "joint_blocks.{i}.x_block.attn2.qkv", "k"),
    ("transformer_blocks.{i}.attn2.to_v", "joint_blocks.{i}.x_block.attn2.qkv", "v"),
    ("transformer_blocks.{i}.attn2.to_out.0", "joint_blocks.{i}.x_block.attn2.proj", ""),
    ("transformer_blocks.{i}.ff.net.0.proj", "joint_blocks.{i}.x_block.mlp.fc1", ""),
    ("transformer_blocks.{i}.ff.net.2", "joint_blocks.{i}.x_block.mlp.fc2", ""),
    ("transformer_blocks.{i}.ff_context.net.0.proj", "joint_blocks.{i}.context_block.mlp.fc1", ""),
    ("transformer_blocks.{i}.ff_context.net.2", "joint_blocks.{i}.context_block.mlp.fc2", ""),
    ("transformer_blocks.{i}.norm1.linear", "joint_blocks.{i}.x_block.adaLN_modulation.1", ""),
    # The last block's context adaLN (pre-only: two chunks) is swapped like the final layer's;
    # the others (six chunks) have the same order in both: "ss" swaps two-chunk layers only.
    ("transformer_blocks.{i}.norm1_context.linear", "joint_blocks.{i}.context_block.adaLN_modulation.1", SWAP_TAG),
    ("pos_embed.proj", "x_embedder.proj", ""),
    ("context_embedder", "context_embedder", ""),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", ""),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", ""),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0", ""),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", ""),
    ("proj_out", "final_layer.linear", ""),
    ("norm_out.linear", "final_layer.adaLN_modulation.1", SWAP_TAG),
)
TABLES = {"flux1": _FLUX_TABLE, "sd3": _SD3_TABLE}

# ss_base_model_version: kohya's values (flux_utils.MODEL_VERSION_FLUX_V1 = "flux1"; SD3 writes
# the MMDiT's model_type, "5-medium"/"5-large"); modelspec.architecture: kohya's sai_model_spec.
DIT_METADATA: dict[str, dict[str, str]] = {
    "flux1-dev": {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora",
                  "modelspec.implementation": "https://github.com/black-forest-labs/flux"},
    "flux1-schnell": {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-schnell/lora",
                      "modelspec.implementation": "https://github.com/black-forest-labs/flux"},
    "sd3.5-medium": {"ss_base_model_version": "5-medium", "modelspec.architecture": "stable-diffusion-3-5-medium/lora",
                     "modelspec.implementation": "diffusers"},
    "sd3.5-large": {"ss_base_model_version": "5-large", "modelspec.architecture": "stable-diffusion-3-5-large/lora",
                    "modelspec.implementation": "diffusers"},
}
DIT_METADATA["sd3-medium"] = DIT_METADATA["sd3.5-medium"]
DIT_METADATA["sd3-large"] = DIT_METADATA["sd3.5-large"]


def _check_family(family: str) -> None:
    if family not in TABLES:
        raise LoraFormatError(f"unknown transformer family {family!r} (expected {' or '.join(FAMILIES)})")


def _pattern(template: str, sep: str) -> str:
    return re.escape(template.replace(".", sep)).replace(re.escape("{i}"), r"(\d+)")


@functools.cache
def _forward(family: str) -> list[tuple[re.Pattern[str], str, str]]:
    return [(re.compile(_pattern(dif, ".")), orig, tag) for dif, orig, tag in TABLES[family]]


@functools.cache
def _backward(family: str) -> dict[str, list[tuple[re.Pattern[str], str]]]:
    """{tag: [(file-body regex, diffusers template)]}."""
    out: dict[str, list[tuple[re.Pattern[str], str]]] = {}
    for dif, orig, tag in TABLES[family]:
        out.setdefault(tag, []).append((re.compile(_pattern(orig, "_")), dif))
    return out


def _te_body(family: str, root: str, path: str) -> str:
    if root == _T5_ROOTS[family]:
        m = re.fullmatch(r"(?:.*\.)?(encoder\.block\.\d+\.layer\.\d+\.\w+\.\w+)", path)
        if m is None:
            raise LoraFormatError(f"{_LABELS[family]}: T5 module {path!r} has no LoRA file name "
                                  "(expected encoder.block.N.layer.M....)")
        return m.group(1)
    return te_hf_path(path, "hf")


def dit_lora_key(family: str, root: str, path: str) -> str:
    """The key of module ``path`` of root ``root`` (unet, te1, te2, te3): the file key, plus
    ``@tag`` for a module that is one part of a fused file layer or a swapped one."""
    _check_family(family)
    prefixes = PREFIXES[family]
    if root not in prefixes:
        raise LoraFormatError(f"{_LABELS[family]}: unknown LoRA root {root!r} (expected {', '.join(prefixes)})")
    if root != "unet":
        return prefixes[root] + _te_body(family, root, path).replace(".", "_")
    for regex, orig, tag in _forward(family):
        m = regex.fullmatch(path)
        if m:
            body = orig.replace("{i}", m.group(1)) if m.groups() else orig
            return prefixes[root] + body.replace(".", "_") + (SEP + tag if tag else "")
    raise LoraFormatError(f"{_LABELS[family]}: transformer module {path!r} has no name in the LoRA files "
                          "ComfyUI, Forge Neo and kohya read; target the blocks' linear layers")


def split_key(key: str) -> tuple[str, str]:
    """``lora_unet_x_qkv@q`` -> (``lora_unet_x_qkv``, ``q``); a key without a tag -> (key, "")."""
    file_key, _, tag = key.partition(SEP)
    return file_key, tag


def dit_module_path(family: str, key: str) -> tuple[str, str]:
    """(root, module path) of a module key (a file key, or a file key with its ``@tag``); a fused
    file key without its tag names several modules: see :func:`fused_parts`. Transformer paths
    are diffusers'; CLIP paths carry ``text_model.`` (transformers 5's CLIPTextModel has none),
    T5 paths start at ``encoder.``."""
    _check_family(family)
    file_key, tag = split_key(key)
    for root, prefix in PREFIXES[family].items():
        if not file_key.startswith(prefix):
            continue
        body = file_key[len(prefix):]
        if root != "unet":
            return root, _te_path(family, root, body, key)
        for regex, dif in _backward(family).get(tag, []):
            m = regex.fullmatch(body)
            if m:
                return root, dif.replace("{i}", m.group(1)) if m.groups() else dif
        if not tag and fused_parts(family, file_key):
            raise LoraFormatError(f"{_LABELS[family]}: LoRA key {key!r} is a fused layer of "
                                  f"{len(fused_parts(family, file_key))} modules; split it with module_tensors")
        break
    raise LoraFormatError(f"{_LABELS[family]}: LoRA key {key!r} names no module of the model")


_TE_BODY = re.compile(r"text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])")
_T5_BODY = re.compile(r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention_[qkvo]|DenseReluDense_(?:wi_0|wi_1|wi|wo))")


def _te_path(family: str, root: str, body: str, key: str) -> str:
    if root == _T5_ROOTS[family]:
        m = _T5_BODY.fullmatch(body)
        if m:
            child = m.group(3).replace("SelfAttention_", "SelfAttention.").replace("DenseReluDense_", "DenseReluDense.")
            return f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{child}"
    else:
        m = _TE_BODY.fullmatch(body)
        if m:
            child = m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return f"text_model.encoder.layers.{m.group(1)}.{child}"
    raise LoraFormatError(f"{_LABELS[family]}: LoRA key {key!r} names no text-encoder module")


def fused_parts(family: str, file_key: str) -> tuple[str, ...]:
    """The part tags of a fused file layer in row order (``("q", "k", "v")``), () for others."""
    _check_family(family)
    if not file_key.startswith(PREFIXES[family]["unet"]):
        return ()
    body = file_key[len(PREFIXES[family]["unet"]):]
    for name, parts in FUSED_PARTS.items():
        if body.endswith("_" + name) and any(r.fullmatch(body) for r, _ in _backward(family).get(parts[0], [])):
            return parts
    return ()


def known_file_key(family: str, key: str) -> bool:
    """Whether a file module key (no tensor suffix) names a layer of a ``family`` model."""
    if SEP in key:
        return False  # part tags never appear in files
    if fused_parts(family, key) or _is_swap_key(family, key):
        return True
    try:
        dit_module_path(family, key)
    except LoraFormatError:
        return False
    return True






# --- tensors: trained modules <-> file layers ----------------------------------------------------
def _swap_halves(up: torch.Tensor, fan_in: int) -> torch.Tensor:
    """(scale, shift) rows <-> (shift, scale) rows of a two-chunk adaLN layer; others unchanged."""
    if up.shape[0] != 2 * fan_in:
        return up
    half = up.shape[0] // 2
    return torch.cat([up[half:], up[:half]])


def _is_swap_key(family: str, file_key: str) -> bool:
    prefix = PREFIXES[family]["unet"]
    body = file_key[len(prefix):] if file_key.startswith(prefix) else None
    return body is not None and any(r.fullmatch(body) for r, _ in _backward(family).get(SWAP_TAG, []))


def _require_lora(key: str, m: ModuleTensors) -> None:
    if m.kind != "lora":
        raise LoraFormatError(f"LoRA module {key!r} is {m.kind}: the file stores it fused with other modules "
                              "(q/k/v) or reordered, which is exact for LoRA/LoCon only; use network.type lora")


def _part_rows(parts: tuple[str, ...], fan_in: int, total: int) -> list[int]:
    """Output rows of each part of a fused layer: q/k/v have the input width; mlp the rest."""
    rows = [fan_in] * len(parts)
    if parts[-1] == "mlp":
        rows[-1] = total - fan_in * (len(parts) - 1)
    if sum(rows) != total or min(rows) <= 0:
        raise LoraFormatError(f"fused LoRA layer with {total} output rows does not split into {parts} "
                              f"of input width {fan_in}")
    return rows


# Flux's single blocks: proj_mlp has mlp_ratio (4) times the width (diffusers' default, the same
# in ComfyUI's and Forge's flux_to_diffusers), needed to zero-fill an untrained proj_mlp.
_MLP_RATIO = 4


def _fuse(key: str, parts: tuple[str, ...], got: dict[str, ModuleTensors]) -> ModuleTensors:
    """Several modules -> one layer: downs stacked, ups block-diagonal, each part's alpha/rank
    folded into its up where it differs from the first part's; absent parts are zero blocks."""
    for tag, m in got.items():
        _require_lora(f"{key}{SEP}{tag}", m)
    first = got[next(t for t in parts if t in got)]
    fan_in = first.tensors["lora_down.weight"].shape[1]
    rank = max(m.rank or 0 for m in got.values())
    scale = first.alpha / first.rank
    downs, ups = [], []
    for tag in parts:
        down = first.tensors["lora_down.weight"].new_zeros(rank, fan_in)
        m = got.get(tag)
        if m is None:  # not trained: a zero block
            ups.append(down.new_zeros(fan_in * (_MLP_RATIO if tag == "mlp" else 1), rank))
        else:
            d, u = m.tensors["lora_down.weight"], m.tensors["lora_up.weight"]
            own = m.alpha / m.rank
            down[: d.shape[0]] = d
            ups.append(torch.cat([u if own == scale else u * (own / scale), u.new_zeros(u.shape[0], rank - u.shape[1])], 1))
        downs.append(down)
    total = len(parts) * rank
    return ModuleTensors("lora", {"lora_down.weight": torch.cat(downs), "lora_up.weight": torch.block_diag(*ups)},
                         scale * total)


def file_tensors(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trained modules (keys from :func:`dit_lora_key`) -> the file's tensors: fused layers put
    together, swapped layers reordered; every other module as it is. The input is not modified."""
    _check_family(family)
    modules = read_modules(tensors)
    dtype = _weight_dtype(tensors)
    out: dict[str, ModuleTensors] = {}
    fused: dict[str, dict[str, ModuleTensors]] = {}
    for key, m in modules.items():
        file_key, tag = split_key(key)
        if tag == SWAP_TAG:
            _require_lora(key, m)
            down = m.tensors["lora_down.weight"]
            out[file_key] = ModuleTensors("lora", {"lora_down.weight": down,
                                                   "lora_up.weight": _swap_halves(m.tensors["lora_up.weight"], down.shape[1])},
                                          m.alpha)
        elif tag:
            fused.setdefault(file_key, {})[tag] = m
        else:
            out[key] = m
    for file_key, got in fused.items():
        parts = fused_parts(family, file_key)
        if not parts or set(got) - set(parts):
            raise LoraFormatError(f"LoRA modules {sorted(got)} of {file_key!r} are no parts of a fused layer")
        out[file_key] = _fuse(file_key, parts, got)
    return _write(out, tensors, dtype)


def _weight_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the file's weights (alpha is float32 whatever they are)."""
    return next((t.dtype for k, t in tensors.items() if not k.endswith(".alpha")), torch.float32)


def _write(modules: dict[str, ModuleTensors], source: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    flat = write_modules(modules, dtype)
    for key in flat:  # alpha keeps the dtype it had (float32 in our files)
        if key.endswith(".alpha"):
            flat[key] = flat[key].to(next((v.dtype for k, v in source.items() if k.endswith(".alpha")), torch.float32))
    return flat


def _split(key: str, parts: tuple[str, ...], m: ModuleTensors) -> dict[str, ModuleTensors]:
    """One fused layer -> its modules. A block-diagonal up (as written here or by kohya's
    split_qkv) gives each part its own down rows; padding (all-zero down rows) is dropped. Any
    other up (a LoRA trained on the fused layer) gives every part the whole down and its rows."""
    _require_lora(key, m)
    down, up = m.tensors["lora_down.weight"], m.tensors["lora_up.weight"]
    total_rank, fan_in = down.shape
    rows = _part_rows(parts, fan_in, up.shape[0])
    starts = [sum(rows[:i]) for i in range(len(parts))]
    n = len(parts)
    rank = total_rank // n if total_rank % n == 0 else 0
    block = rank and all(
        not up[starts[i]: starts[i] + rows[i]].narrow(1, j * rank, rank).any()
        for i in range(n) for j in range(n) if i != j)
    out: dict[str, ModuleTensors] = {}
    scale = m.alpha / total_rank
    for i, tag in enumerate(parts):
        u = up[starts[i]: starts[i] + rows[i]]
        if not block:
            out[tag] = ModuleTensors("lora", {"lora_down.weight": down, "lora_up.weight": u}, m.alpha)
            continue
        d, u = down[i * rank:(i + 1) * rank], u[:, i * rank:(i + 1) * rank]
        keep = d.any(dim=1)
        if not keep.any():
            continue  # a part that was not trained: zero padding
        if not keep.all():
            d, u = d[keep], u[:, keep]
        out[tag] = ModuleTensors("lora", {"lora_down.weight": d, "lora_up.weight": u}, scale * d.shape[0])
    return out


def module_tensors(family: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors -> one entry per trained module (keys as :func:`dit_lora_key` makes
    them); the inverse of :func:`file_tensors`. Keys that already carry a tag pass through."""
    _check_family(family)
    modules = read_modules(tensors)
    dtype = _weight_dtype(tensors)
    out: dict[str, ModuleTensors] = {}
    for key, m in modules.items():
        parts = () if SEP in key else fused_parts(family, key)
        if parts:
            for tag, part in _split(key, parts, m).items():
                out[f"{key}{SEP}{tag}"] = part
        elif SEP not in key and _is_swap_key(family, key):
            _require_lora(key, m)
            down = m.tensors["lora_down.weight"]
            out[f"{key}{SEP}{SWAP_TAG}"] = ModuleTensors(
                "lora", {"lora_down.weight": down, "lora_up.weight": _swap_halves(m.tensors["lora_up.weight"], down.shape[1])},
                m.alpha)
        else:
            out[key] = m
    return _write(out, tensors, dtype)


# --- detection -----------------------------------------------------------------------------------
_FLUX_KEYS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_")
_SD3_KEYS = ("lora_unet_joint_blocks_",)


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """"flux1" / "sd3" from kohya's ss_base_model_version or the model spec's architecture."""
    version = metadata.get("ss_base_model_version", "").lower()
    spec = metadata.get("modelspec.architecture", "").lower()
    if version.startswith(("flux1", "flux_1", "flux-1")) or spec.startswith("flux-1"):
        return "flux1"
    if version.startswith(("sd3", "5-medium", "5-large")) or spec.startswith("stable-diffusion-3"):
        return "sd3"
    return None


def dit_family_from_keys(keys: set[str] | list[str], metadata: dict[str, str]) -> str | None:
    """The transformer family a LoRA file was made for: from its metadata, else its keys
    (module keys or tensor keys); None when it is neither Flux.1 nor SD3."""
    found = family_from_metadata(metadata)
    if found:
        return found
    if any(k.startswith(_FLUX_KEYS) for k in keys):
        return "flux1"
    if any(k.startswith(_SD3_KEYS) for k in keys):
        return "sd3"
    return None


def variant_from_metadata(metadata: dict[str, str]) -> str | None:
    """The DIT_METADATA entry a file's model spec names ("flux1-dev", "sd3.5-large", ...)."""
    spec = metadata.get("modelspec.architecture", "")
    return next((name for name, md in DIT_METADATA.items()
                 if md["modelspec.architecture"] == spec and not name.startswith("sd3-")), None)
