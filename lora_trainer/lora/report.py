"""What a LoRA file holds and what each loader does with it (``python -m lora_trainer inspect``).

Names, kinds and shapes: every module key is checked against the model family's layer names,
its tensors against the shape of the layer of that name (full-size or tiny demo layout, built
on the meta device: :mod:`lora_trainer.lora.layout`), and the verdicts say what A1111 v1.10.1,
Forge, ComfyUI and diffusers really do with the file (:mod:`lora_trainer.lora.verdicts`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import torch

from lora_trainer.errors import LoraFormatError
from lora_trainer.families import Family, all_families, detect_lora, detect_lora_keys, detect_lora_metadata
from lora_trainer.lora import kohya, kohya_tensors, layout
from lora_trainer.lora.tensor_groups import SUMMARY_KEYS, kind_of, recipe, split_tensors
from lora_trainer.lora.verdicts import Facts as _Facts
from lora_trainer.lora.verdicts import verdicts as _verdicts


def arch_from_metadata(md: dict[str, str]) -> str | None:
    """The family the metadata names, or None."""
    family = detect_lora_metadata(md)
    return family.name if family is not None else None


def a1111_version_label(md: dict[str, str]) -> str:
    """The base-model version A1111 shows on the LoRA card (it hides cards that do not match)."""
    if md:
        for family in all_families():
            if family.a1111_version_label and family.a1111_shows(md):
                return family.a1111_version_label
    return "Unknown"


def _group(key: str) -> str:
    if key.startswith("lora_unet_"):
        rest = key[len("lora_unet_"):]
        if rest.startswith(("down_blocks", "input_blocks")):
            return "unet down"
        if rest.startswith(("mid_block", "middle_block")):
            return "unet mid"
        if rest.startswith(("up_blocks", "output_blocks")):
            return "unet up"
        return "unet other"
    for p in ("lora_te1_", "lora_te2_", "lora_te_"):
        if key.startswith(p):
            return p[len("lora_"):-1]
    return "unknown"


def _target_kind(key: str) -> str:
    if key in _SGM_SINGLE:
        return _SGM_SINGLE[key]
    m = re.search(r"(attn[12]_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2|proj_in|proj_out|self_attn_[qkv]_proj"
                  r"|self_attn_out_proj|mlp_fc[12]|time_embedding_linear_[12]|add_embedding_linear_[12]|conv\w*|op"
                  r"|time_emb_proj|skip_connection|(?:in|out|emb)_layers_\d+)$", key)
    return m.group(1) if m else key.rsplit("_", 1)[-1]


# The UNet's single layers in SGM/LDM naming (SDXL files), by their diffusers names.
_SGM_SINGLE = {"lora_unet_input_blocks_0_0": "conv_in", "lora_unet_out_2": "conv_out",
               "lora_unet_time_embed_0": "time_embedding_linear_1", "lora_unet_time_embed_2": "time_embedding_linear_2",
               "lora_unet_label_emb_0_0": "add_embedding_linear_1", "lora_unet_label_emb_0_2": "add_embedding_linear_2"}


_TUCKER = {"hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight"}






def _arch(modules: dict[str, Any], md: dict[str, str]) -> tuple[Family | None, Family | None]:
    """(family from the metadata, family from the keys)."""
    return detect_lora_metadata(md), detect_lora_keys(set(modules))


def _keys_label(family: Family | None) -> str | None:
    """How ``inspect`` names the family of a file's keys ("sd1/sd2": their keys are alike)."""
    return (family.lora_keys_label or family.name) if family is not None else None


def _shapes(arch: str | None, modules: dict[str, dict[str, torch.Tensor]],
            kinds: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """Which layout the file fits (the full-size, tiny test or demo model) and the modules that do
    not fit it."""
    if arch is None:
        return None, {}
    best: tuple[str | None, dict[str, str]] = (None, {})
    for size in layout.sizes_of(arch):
        try:
            shapes = layout.family_shapes(arch, size)
        except Exception:  # noqa: BLE001 - no diffusers/transformers: names only
            return None, {}
        wrong, seen = {}, 0
        for name, g in modules.items():
            # Tucker/CP forms (hada_t1, lokr_t2, lora_mid) orient their factors otherwise: not checked.
            if name in shapes and kinds[name] in ("lora", "loha", "lokr") and not set(g) & _TUCKER:
                seen += 1
                try:
                    m = kohya_tensors.ModuleTensors("dora" if "dora_scale" in g else kinds[name],
                                            {k: v for k, v in g.items() if k != "alpha"}, 1.0)
                    why = layout.shape_problem(m, shapes[name])
                except KeyError:
                    continue  # incomplete module: reported as such
                if why:
                    wrong[name] = why
        if seen and (best[0] is None or len(wrong) < len(best[1])):
            best = (size, wrong)
    return best


def analyse(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> dict[str, Any]:
    """Everything ``inspect`` prints, as plain data (JSON-serialisable)."""
    modules, bad_keys = split_tensors(tensors)
    family = detect_lora(set(modules), md)
    own = family.inspect_report(tensors, md) if family is not None else None
    if own is not None:  # a family with its own layers and loaders (Flux.1, SD3.5)
        return own
    kinds = {m: kind_of(set(g)) for m, g in modules.items()}
    problems: list[str] = []
    if bad_keys:
        problems.append(f"{len(bad_keys)} keys are no LoRA/LyCORIS tensors (first: {bad_keys[0]})")
    no_alpha = sorted(m for m, g in modules.items() if "alpha" not in g and kohya_tensors.rank_of_tensors(g) is not None)
    incomplete = []
    for m, g in sorted(modules.items()):
        if kinds[m] in ("lora", "loha", "lokr"):
            try:
                kohya_tensors.module_kind(m, (set(g) - _TUCKER) | {"alpha"})
            except LoraFormatError:
                incomplete.append(m)
    bad_rank = sorted(m for m, g in modules.items() if m not in incomplete and kinds[m] == "lora"
                      and g["lora_up.weight"].shape[1] != g["lora_down.weight"].shape[0])
    if no_alpha:
        problems.append(f"{len(no_alpha)} modules have no alpha (loaders use scale 1, not alpha/rank; first: {no_alpha[0]})")
    if incomplete:
        problems.append(f"{len(incomplete)} modules lack tensors of their kind (first: {incomplete[0]})")
    if bad_rank:
        problems.append(f"{len(bad_rank)} modules have lora_up/lora_down of different rank (first: {bad_rank[0]})")

    groups: dict[str, dict[str, Any]] = {}
    for name, g in sorted(modules.items()):
        info = groups.setdefault(_group(name), {"modules": 0, "ranks": set(), "alphas": set()})
        info["modules"] += 1
        if kohya_tensors.rank_of_tensors(g) is not None:
            info["ranks"].add(kohya_tensors.rank_of_tensors(g))
        if "alpha" in g:
            info["alphas"].add(float(g["alpha"].float().item()))
    for info in groups.values():
        info["ranks"], info["alphas"] = sorted(info["ranks"]), sorted(info["alphas"])

    prefixes = sorted({_group(m).split(" ")[0] for m in modules})
    md_family, key_family = _arch(modules, md)
    key_arch, md_arch = _keys_label(key_family), md_family.name if md_family else None
    family = md_family or key_family
    arch = family.name if family is not None else None
    if md_arch and key_arch and _keys_label(md_family) != key_arch:
        problems.append(f"metadata says {md_arch} but the keys look like {key_arch}")
    mixed_te = "te" in prefixes and ("te1" in prefixes or "te2" in prefixes)
    if mixed_te:
        problems.append("mixed text-encoder prefixes lora_te_ and lora_te1_/lora_te2_")
    unknown_prefix = sorted(m for m in modules if _group(m) == "unknown")
    unresolved = sorted(m for m in modules if arch and _group(m) != "unknown" and not kohya.known_module_key(arch, m))
    if unknown_prefix:
        problems.append(f"{len(unknown_prefix)} modules do not start with lora_unet_/lora_te_/lora_te1_/lora_te2_ "
                        f"(first: {unknown_prefix[0]})")
    if unresolved:
        problems.append(f"{len(unresolved)} modules match no module of a {arch} model (first: {unresolved[0]})")
    fits, wrong_shape = _shapes(arch, modules, kinds)
    if wrong_shape:
        first = next(iter(sorted(wrong_shape)))
        problems.append(f"{len(wrong_shape)} modules do not fit the {arch} model's layer of that name "
                        f"(first: {first} {wrong_shape[first]}): names right, tensors from another layer")
    dora = {m: ("output" if g["dora_scale"].shape[0] != 1 else "input") for m, g in modules.items() if "dora_scale" in g}
    facts = _Facts(arch, bad_keys, no_alpha, incomplete + bad_rank, unknown_prefix, unresolved, wrong_shape,
                   kinds, modules, dora, mixed_te)
    return {
        "architecture": arch, "architecture_from_keys": key_arch, "architecture_from_metadata": md_arch,
        "a1111_version_label": a1111_version_label(md), "layout": fits,
        "key_count": len(tensors), "module_count": len(modules), "prefixes": prefixes,
        "kinds": dict(sorted(Counter(("dora+" if m in dora else "") + k for m, k in kinds.items()).items())),
        "groups": groups, "targets": dict(sorted(Counter(_target_kind(m) for m in modules).items())),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: md[k] for k in SUMMARY_KEYS if k in md}, "recipe": recipe(md),
        "metadata_keys": len(md), "problems": problems, "verdicts": _verdicts(facts),
    }


_LAYOUTS = {"full": "full-size", "tiny": "tiny test model's", "demo": "demo model's"}


def format_report(path: str, r: dict[str, Any]) -> str:
    lines = [f"{path}",
             f"  architecture: {r['architecture'] or 'unknown'} (keys: {r['architecture_from_keys'] or '?'}, "
             f"metadata: {r['architecture_from_metadata'] or '-'}; A1111 shows: {r['a1111_version_label']})",
             f"  keys: {r['key_count']} tensors, {r['module_count']} modules, prefixes: {', '.join(r['prefixes'])}, "
             f"dtypes: {', '.join(r['dtypes'])}",
             "  kinds: " + ", ".join(f"{k}×{v}" for k, v in r["kinds"].items())
             + (f"; shapes fit the {_LAYOUTS[r['layout']]} {r['architecture']} layout" if r["layout"] else "")]
    for name, g in r["groups"].items():
        lines.append(f"  {name:<11} {g['modules']:4d} modules  rank {_join(g['ranks'])}  alpha {_join(g['alphas'])}")
    lines.append("  targets: " + ", ".join(f"{k}×{v}" for k, v in r["targets"].items()))
    if r["metadata"]:
        lines.append(f"  metadata ({r['metadata_keys']} keys):")
        lines += [f"    {k}: {_short(v)}" for k, v in r["metadata"].items()]
    else:
        lines.append("  metadata: none")
    if r.get("recipe"):
        lines.append("  trained with: " + ", ".join(k if v == "True" else f"{k} {v}" for k, v in r["recipe"].items()))
    for p in r["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("  loaders:")
    for loader, v in r["verdicts"].items():
        lines.append(f"    {loader:<20} {'OK' if v['ok'] else 'PROBLEM'}" + (f": {'; '.join(v['issues'])}" if v["issues"] else ""))
    return "\n".join(lines)


def _join(values: list[Any]) -> str:
    return "/".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "-"


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def to_json(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=2, ensure_ascii=False)
