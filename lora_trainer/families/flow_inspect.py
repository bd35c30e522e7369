"""``inspect`` for Flux.1 / SD3.5 LoRA files: the family, modules per block kind, unknown keys, and
what the loaders of these families do with the file (read in their code, see docs/lora-format.md).

Returns the same report shape as :func:`lora_trainer.lora.report.analyse`, so the text and JSON
output and the exit code work the same way.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from lora_trainer.families import flow_lora
from lora_trainer.lora.tensor_groups import SUMMARY_KEYS, kind_of, recipe, split_tensors

_LABEL = {"flux1": "Flux.1", "sd3": "SD3.5"}


def _block_kind(key: str) -> str:
    for prefix in ("lora_te1_", "lora_te2_", "lora_te3_"):
        if key.startswith(prefix):
            return prefix[len("lora_"):-1]
    m = re.match(r"lora_unet_(double_blocks|single_blocks|joint_blocks)_\d+_", key)
    return f"unet {m.group(1).replace('_', ' ')}" if m else "unet other"


def _layer_kind(key: str) -> str:
    m = re.match(r"lora_unet_(?:double|single|joint)_blocks_\d+_(.+)$", key)
    if m:
        return m.group(1)
    return re.sub(r"_layers_\d+_", "_", key.split("_", 2)[-1])


def _verdicts(family: str, kinds: set[str], unknown: list[str], problems: list[str]) -> dict[str, dict[str, Any]]:
    common = [f"{len(unknown)} keys name no layer (first: {unknown[0]})"] if unknown else []
    common += [p for p in problems if "alpha" in p or "rank" in p]
    lycoris = kinds - {"lora"}
    out = {"ComfyUI": {"ok": not common, "issues": list(common)}}
    if family == "flux1":
        # Forge Neo: ComfyUI's model_lora_keys_unet (v0.26.1) on its Flux; "mismatch" when more
        # than half the keys match nothing.
        out["Forge Neo"] = {"ok": not common, "issues": list(common)}
        issues = common + (["diffusers converts kohya Flux files for LoRA only"] if lycoris else [])
        out["diffusers"] = {"ok": not issues, "issues": issues}
    kohya = common + ([f"kohya's lora_{'flux' if family == 'flux1' else 'sd3'} reads LoRA only"] if lycoris else [])
    out["kohya sd-scripts"] = {"ok": not kohya, "issues": kohya}
    return out


def analyse_dit(family: str, tensors: dict[str, torch.Tensor], md: dict[str, str]) -> dict[str, Any]:
    """The report of a Flux.1 / SD3.5 file (``family`` "flux1" or "sd3")."""
    modules, bad = split_tensors(tensors)
    kinds = {m: kind_of(set(g)) for m, g in modules.items()}
    problems = [f"{len(bad)} keys are no LoRA/LyCORIS tensors (first: {bad[0]})"] if bad else []
    no_alpha = sorted(m for m, g in modules.items() if "alpha" not in g)
    if no_alpha:
        problems.append(f"{len(no_alpha)} modules have no alpha (loaders use scale 1, not alpha/rank; first: {no_alpha[0]})")
    bad_rank = sorted(m for m, g in modules.items() if kinds[m] == "lora" and (
        "lora_up.weight" not in g or g["lora_up.weight"].shape[1] != g["lora_down.weight"].shape[0]))
    if bad_rank:
        problems.append(f"{len(bad_rank)} modules have lora_up/lora_down of different rank (first: {bad_rank[0]})")
    unknown = sorted(m for m in modules if not flow_lora.known_file_key(family, m))
    if unknown:
        problems.append(f"{len(unknown)} modules match no layer of a {_LABEL[family]} model (first: {unknown[0]})")
    md_family = flow_lora.family_from_metadata(md)
    key_family = flow_lora.dit_family_from_keys(set(modules), {})
    if md_family and key_family and md_family != key_family:
        problems.append(f"metadata says {md_family} but the keys look like {key_family}")
    groups: dict[str, dict[str, Any]] = {}
    for name, g in sorted(modules.items()):
        info = groups.setdefault(_block_kind(name), {"modules": 0, "ranks": set(), "alphas": set()})
        info["modules"] += 1
        if "lora_down.weight" in g:
            info["ranks"].add(int(g["lora_down.weight"].shape[0]))
        if "alpha" in g:
            info["alphas"].add(float(g["alpha"].float().item()))
    for info in groups.values():
        info["ranks"], info["alphas"] = sorted(info["ranks"]), sorted(info["alphas"])
    variant = flow_lora.variant_from_metadata(md)
    return {
        "architecture": variant or family, "architecture_from_keys": key_family, "architecture_from_metadata": md_family,
        "a1111_version_label": "Unknown", "layout": None, "key_count": len(tensors), "module_count": len(modules),
        "prefixes": sorted({_block_kind(m).split(" ")[0] for m in modules}),
        "kinds": dict(sorted(Counter(kinds.values()).items())), "groups": groups,
        "targets": dict(sorted(Counter(_layer_kind(m) for m in modules).items())),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: md[k] for k in SUMMARY_KEYS if k in md}, "recipe": recipe(md), "metadata_keys": len(md),
        "problems": problems, "verdicts": _verdicts(family, set(kinds.values()), unknown, problems),
    }
