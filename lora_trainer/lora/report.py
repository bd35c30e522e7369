"""What a LoRA file holds and which loaders will read it fully (``python -m lora_trainer inspect``).

The checks mirror how the loaders match keys: diffusers' ``load_lora_weights`` takes a kohya
file only when every key starts with lora_unet_/lora_te_/lora_te1_/lora_te2_; A1111 and Forge
match module keys against the loaded model (unmatched keys are only logged, so the LoRA silently
loses those layers); a missing alpha makes every loader use scale 1 instead of alpha / rank.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from typing import Any

import torch

from lora_trainer.lora import kohya

LOADERS = ("A1111 built-in Lora", "Forge", "ComfyUI", "diffusers")
_SUMMARY_KEYS = ("ss_output_name", "ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim",
                 "ss_network_alpha", "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_steps",
                 "ss_epoch", "ss_learning_rate", "ss_optimizer", "ss_training_finished_at",
                 "modelspec.architecture", "modelspec.trigger_phrase", "modelspec.date")


def arch_from_metadata(md: dict[str, str]) -> str | None:
    version = md.get("ss_base_model_version", "")
    spec = md.get("modelspec.architecture", "")
    if version.startswith("sdxl") or spec.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or md.get("ss_v2") == "True" or spec.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def a1111_version_label(md: dict[str, str]) -> str:
    """The base-model version A1111 shows on the LoRA card (it hides cards that do not match)."""
    if not md:
        return "Unknown"
    if md.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if md.get("ss_v2") == "True":
        return "SD2"
    return "SD1"


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
    m = re.search(r"(attn[12]_to_(?:q|k|v|out_0)|ff_net_0_proj|ff_net_2|proj_in|proj_out|self_attn_[qkv]_proj"
                  r"|self_attn_out_proj|mlp_fc[12]|conv\w*|op|skip_connection|\w+_layers_\d+)$", key)
    return m.group(1) if m else key.rsplit("_", 1)[-1]


def analyse(tensors: dict[str, torch.Tensor], md: dict[str, str]) -> dict[str, Any]:
    """Everything ``inspect`` prints, as plain data (JSON-serialisable)."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bad_keys: list[str] = []
    for key, t in tensors.items():
        suffix = next((s for s in kohya.TENSOR_SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            bad_keys.append(key)
            continue
        modules[key[: -len(suffix) - 1]][suffix] = t
    problems: list[str] = []
    if bad_keys:
        problems.append(f"{len(bad_keys)} keys are not lora_down/lora_up/alpha (first: {bad_keys[0]})")
    no_alpha = sorted(m for m, g in modules.items() if "alpha" not in g)
    incomplete = sorted(m for m, g in modules.items() if not {"lora_down.weight", "lora_up.weight"} <= set(g))
    bad_shape = sorted(m for m, g in modules.items() if m not in incomplete
                       and g["lora_up.weight"].shape[1] != g["lora_down.weight"].shape[0])
    if no_alpha:
        problems.append(f"{len(no_alpha)} modules have no alpha (loaders use scale 1, not alpha/rank; first: {no_alpha[0]})")
    if incomplete:
        problems.append(f"{len(incomplete)} modules lack lora_down or lora_up (first: {incomplete[0]})")
    if bad_shape:
        problems.append(f"{len(bad_shape)} modules have lora_up/lora_down of different rank (first: {bad_shape[0]})")

    groups: dict[str, dict[str, Any]] = {}
    for name, g in sorted(modules.items()):
        info = groups.setdefault(_group(name), {"modules": 0, "ranks": set(), "alphas": set()})
        info["modules"] += 1
        if "lora_down.weight" in g:
            info["ranks"].add(int(g["lora_down.weight"].shape[0]))
        if "alpha" in g:
            info["alphas"].add(float(g["alpha"].float().item()))
    for info in groups.values():
        info["ranks"], info["alphas"] = sorted(info["ranks"]), sorted(info["alphas"])

    prefixes = sorted({_group(m).split(" ")[0] for m in modules})
    key_arch = kohya.detect_arch(set(modules))
    md_arch = arch_from_metadata(md)
    arch = md_arch or ("sdxl" if key_arch == "sdxl" else "sd1" if key_arch else None)
    if md_arch and key_arch and (md_arch == "sdxl") != (key_arch == "sdxl"):
        problems.append(f"metadata says {md_arch} but the keys look like {key_arch}")
    if "te" in prefixes and ("te1" in prefixes or "te2" in prefixes):
        problems.append("mixed text-encoder prefixes lora_te_ and lora_te1_/lora_te2_")
    unknown_prefix = sorted(m for m in modules if _group(m) == "unknown")
    unresolved = sorted(m for m in modules if arch and _group(m) != "unknown" and not kohya.known_module_key(arch, m))
    if unknown_prefix:
        problems.append(f"{len(unknown_prefix)} modules do not start with lora_unet_/lora_te_/lora_te1_/lora_te2_ "
                        f"(first: {unknown_prefix[0]})")
    if unresolved:
        problems.append(f"{len(unresolved)} modules match no module of a {arch} model (first: {unresolved[0]})")
    verdicts = _verdicts(arch, bad_keys, no_alpha, incomplete + bad_shape, unknown_prefix, unresolved)
    return {
        "architecture": arch, "architecture_from_keys": key_arch, "architecture_from_metadata": md_arch,
        "a1111_version_label": a1111_version_label(md),
        "key_count": len(tensors), "module_count": len(modules), "prefixes": prefixes,
        "groups": groups, "targets": dict(sorted(Counter(_target_kind(m) for m in modules).items())),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
        "metadata": {k: md[k] for k in _SUMMARY_KEYS if k in md},
        "metadata_keys": len(md), "problems": problems, "verdicts": verdicts,
    }


def _verdicts(arch: str | None, bad_keys: list[str], no_alpha: list[str], broken: list[str],
              unknown_prefix: list[str], unresolved: list[str]) -> dict[str, dict[str, Any]]:
    common: list[str] = []
    if arch is None:
        common.append("architecture unknown (no metadata and no recognisable keys)")
    if broken:
        common.append(f"{len(broken)} broken modules")
    if no_alpha:
        common.append("strength differs: missing alpha means scale 1")
    out: dict[str, dict[str, Any]] = {}
    for loader in LOADERS:
        issues = list(common)
        if loader == "diffusers":
            if unknown_prefix or bad_keys:
                issues.append("not read as kohya: every key must start with lora_unet_/lora_te_/lora_te1_/lora_te2_ "
                              "and end in lora_down.weight/lora_up.weight/alpha")
        elif unknown_prefix or unresolved or bad_keys:
            n = len(unknown_prefix) + len(unresolved) + len(bad_keys)
            issues.append(f"{n} keys would not match the model and would be skipped silently")
        out[loader] = {"ok": not issues, "issues": issues}
    return out


def format_report(path: str, r: dict[str, Any]) -> str:
    lines = [f"{path}",
             f"  architecture: {r['architecture'] or 'unknown'} (keys: {r['architecture_from_keys'] or '?'}, "
             f"metadata: {r['architecture_from_metadata'] or '-'}; A1111 shows: {r['a1111_version_label']})",
             f"  keys: {r['key_count']} tensors, {r['module_count']} modules, prefixes: {', '.join(r['prefixes'])}, "
             f"dtypes: {', '.join(r['dtypes'])}"]
    for name, g in r["groups"].items():
        lines.append(f"  {name:<11} {g['modules']:4d} modules  rank {_join(g['ranks'])}  alpha {_join(g['alphas'])}")
    lines.append("  targets: " + ", ".join(f"{k}×{v}" for k, v in r["targets"].items()))
    if r["metadata"]:
        lines.append(f"  metadata ({r['metadata_keys']} keys):")
        lines += [f"    {k}: {_short(v)}" for k, v in r["metadata"].items()]
    else:
        lines.append("  metadata: none")
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
