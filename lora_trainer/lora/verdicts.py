"""What each loader does with a LoRA file: read in their code, not guessed from naming rules.

* A1111 v1.10.1 (extensions-builtin/Lora): matches module keys against the loaded model; keys
  that match nothing are only logged at debug level (those layers are silently left out). A
  module whose tensors no module type accepts makes the whole file fail to load ("Could not
  find a module type"). Types: LoRA/LoCon, LoHa, LoKr, IA3, OFT/BOFT, GLoRA, full/diff.
  ``dora_scale`` is always taken per input channel (``apply_weight_decompose``).
* Forge (sd_forge_lora + packages_3rdparty/comfyui_lora_collection): counts the tensor keys no
  UNet or text-encoder layer takes; more than 12 and it loads **nothing** of the file ("LoRA
  version mismatch"). Types: LoRA/LoCon, LoHa, LoKr, GLoRA, diff — no OFT, no IA3.
* ComfyUI (comfy/lora.py, comfy/weight_adapter/): loads what matches, warns "lora key not
  loaded" for the rest. Types: LoRA/LoCon, LoHa, LoKr, GLoRA, OFT, BOFT, diff.
* Forge and ComfyUI read a ``dora_scale`` of shape (1, in) per input channel like A1111; one of
  shape (out, 1) per output channel, but divided by the norm of the *base* weight rather than of
  W + ΔW (``weight_decompose``), so such a file comes out only approximately.
* diffusers' ``load_lora_weights`` takes a kohya file only when every key starts with
  lora_unet_/lora_te_/lora_te1_/lora_te2_, and reads lora_down/lora_up/alpha only.
* All three WebUIs load ``lora_te1_`` text-encoder keys of an SD1 file (as ``lora_te_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

LOADERS = ("A1111 built-in Lora", "Forge", "ComfyUI", "diffusers")
LOADER_KINDS = {
    "A1111 built-in Lora": {"lora", "loha", "lokr", "oft", "ia3", "glora", "full"},
    "Forge": {"lora", "loha", "lokr", "glora", "full"},
    "ComfyUI": {"lora", "loha", "lokr", "oft", "glora", "full"},
    "diffusers": {"lora"},
}
FORGE_MAX_UNMATCHED = 12  # sd_forge_lora/networks.py: more unmatched keys -> the whole LoRA is dropped


@dataclass
class Facts:
    """What ``report.analyse`` found, as the verdicts need it."""

    arch: str | None
    bad_keys: list[str]
    no_alpha: list[str]
    broken: list[str]
    unknown_prefix: list[str]
    unresolved: list[str]
    wrong_shape: dict[str, str]
    kinds: dict[str, str]  # module -> lora, loha, lokr, oft, ia3, glora, full, unknown
    modules: dict[str, dict[str, torch.Tensor]]
    dora: dict[str, str]  # module -> "input" or "output" (the axis of its dora_scale)
    mixed_te: bool = False  # lora_te_ and lora_te1_/lora_te2_ in one file


def _unmatched_keys(f: Facts, unmatched: list[str], unsupported: list[str]) -> int:
    """Tensor keys Forge/ComfyUI leave over: every key of a module that matches no layer; of a
    matched module of a kind they do not apply, all but alpha and dora_scale (read for any kind)."""
    n = sum(len(f.modules[m]) for m in unmatched) + len(f.bad_keys)
    return n + sum(len(set(f.modules[m]) - {"alpha", "dora_scale"}) for m in unsupported if m not in unmatched)


def _loader_issues(loader: str, f: Facts) -> list[str]:
    unsupported = sorted(m for m, k in f.kinds.items() if k not in LOADER_KINDS[loader])
    kinds = sorted({f.kinds[m] for m in unsupported})
    unmatched = f.unknown_prefix + f.unresolved
    out_axis = [m for m, axis in f.dora.items() if axis == "output"]
    issues: list[str] = []
    if loader == "A1111 built-in Lora":
        if unsupported:
            issues.append(f"does not load the file at all: no module type takes {'/'.join(kinds)} "
                          f"({len(unsupported)} modules)")
        if unmatched or f.bad_keys:
            issues.append(f"{len(unmatched) + len(f.bad_keys)} modules/keys match no layer and are left out "
                          "(logged at debug level only)")
        if out_axis:
            issues.append(f"applies dora_scale per input channel; this file's is per output channel "
                          f"({len(out_axis)} modules): wrong weights")
    elif loader == "Forge":
        n = _unmatched_keys(f, unmatched, unsupported)
        if n > FORGE_MAX_UNMATCHED:
            issues.append(f"loads NOTHING of this file: {n} keys match no layer it can patch "
                          f"(Forge drops the whole LoRA above {FORGE_MAX_UNMATCHED} unmatched keys)")
        elif n:
            issues.append(f"{n} keys match no layer it can patch and are left out")
        if out_axis and n <= FORGE_MAX_UNMATCHED:
            issues.append(f"per-output dora_scale ({len(out_axis)} modules) is divided by the base weight's norm, "
                          "not the merged one: approximate")
    elif loader == "ComfyUI":
        n = _unmatched_keys(f, unmatched, unsupported)
        if n:
            issues.append(f"{n} keys are not loaded (warned as 'lora key not loaded'); the rest is applied")
        if out_axis:
            issues.append(f"per-output dora_scale ({len(out_axis)} modules) is divided by the base weight's norm, "
                          "not the merged one: approximate")
    else:
        if f.unknown_prefix or f.bad_keys or unsupported:
            issues.append("not read as kohya: every key must start with lora_unet_/lora_te_/lora_te1_/lora_te2_ "
                          "and be lora_down.weight/lora_up.weight/alpha"
                          + (f" (this file has {'/'.join(kinds)} modules)" if kinds else ""))
        if f.dora:
            issues.append("reads dora_scale as peft's per-output magnitude: the DoRA loads, but not as trained")
    return issues


def verdicts(f: Facts) -> dict[str, dict[str, Any]]:
    """{loader: {"ok": bool, "issues": [...]}} for every loader in :data:`LOADERS`."""
    common: list[str] = []
    if f.arch is None:
        common.append("architecture unknown (no metadata and no recognisable keys)")
    if f.broken:
        common.append(f"{len(f.broken)} broken modules")
    if f.no_alpha:
        common.append("strength differs: missing alpha means scale 1")
    if f.mixed_te:
        # A1111 keys its modules by the layer they map to; ComfyUI/Forge their patches: the later wins.
        common.append("lora_te_ and lora_te1_ name the same text-encoder layers: loaders keep one of the two")
    if f.wrong_shape:
        common.append(f"{len(f.wrong_shape)} modules do not fit their layer: they fail to apply, or land on the "
                      "wrong weights where the sizes happen to match")
    return {loader: {"ok": not (common + (issues := _loader_issues(loader, f))), "issues": common + issues}
            for loader in LOADERS}
