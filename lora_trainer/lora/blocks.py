"""kohya's UNet blocks: learning rates and ranks per block (``networks.lora``'s network_args
``down_lr_weight``, ``mid_lr_weight``, ``up_lr_weight``, ``block_lr_zero_threshold``,
``block_dims``, ``block_alphas``, ``conv_block_dims``, ``conv_block_alphas``).

SD1 and SD2 have 25 blocks: 12 down (shallow to deep), 1 mid, 12 up (deep to shallow); a
module's block is ``1 + 3 i + j`` for ``down_blocks.i.attentions/resnets.j`` (the down sampler
``1 + 3 i + 2``), 12 for the mid block and ``13 + 3 i + j`` for the up blocks; block 0 has no
module. SDXL has 23, by the SGM path of its kohya names: 0 for the time and label embeddings, 1-9
``input_blocks.0-8``, 10-12 ``middle_block.0-2``, 13-21 ``output_blocks.0-8``, 22 ``out``. A
module in no block (a target outside the UNet's blocks) keeps weight 1 and the network's rank.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lora_trainer.errors import ConfigError

CURVES = ("cosine", "sine", "linear", "reverse_linear", "zeros")
_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")
LR_FIELDS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
DIM_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")


def has_blocks(arch: str) -> bool:
    """Whether family ``arch`` has kohya's UNet blocks (its ``kohya_blocks``)."""
    from lora_trainer.families import family_names, get_family

    return arch in family_names() and get_family(arch).kohya_blocks is not None


def block_archs() -> list[str]:
    """The families with kohya's UNet blocks."""
    from lora_trainer.families import family_names

    return [a for a in family_names() if has_blocks(a)]


def _layout(arch: str) -> tuple[int, int, bool]:
    from lora_trainer.families import get_family

    layout = get_family(arch).kohya_blocks
    assert layout is not None, arch
    return layout


def sizes(arch: str) -> tuple[int, int, int]:
    """(blocks per side, mid blocks, all blocks) of ``arch``'s UNet."""
    side, mid, sgm = _layout(arch)
    return side, mid, 2 * side + mid + (2 if sgm else 0)


def block_index(arch: str, key: str) -> int | None:
    """The block of the UNet module with kohya name ``key`` (None: in no block)."""
    name = key.removeprefix("lora_unet_")
    side_count, mid_count, sgm = _layout(arch)
    if sgm:
        for prefix, first in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(prefix):
                return first + int(name[len(prefix):].split("_", 1)[0])
        return 0 if name.startswith(("time_embed_", "label_emb_")) else 22 if name.startswith("out_") else None
    m = _UPDOWN.search(name)
    if m:
        side, i, kind, j = m.groups()
        idx = 3 * int(i) + (2 if kind.endswith("samplers") else int(j))
        return 1 + idx if side == "down" else side_count + 1 + idx
    return side_count if "mid_block_" in name else None


def _numbers(text: str, field: str, kind: type = float) -> list[float]:
    try:
        return [kind(s) if s.strip() else kind(0) for s in text.split(",")]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise ConfigError(f"network.{field}: {text!r} must be {what} separated by commas") from None


def _side_weights(text: str, field: str, count: int) -> list[float]:
    """One side's weights: numbers, or a curve with an optional '+base' (kohya's forms)."""
    if "," in text or not re.fullmatch(r"[a-z_]+", text.split("+", 1)[0].strip()):
        return _numbers(text, field)
    name, _, base_text = text.partition("+")
    if name.strip() not in CURVES:
        raise ConfigError(f"network.{field}: {text!r} is neither numbers separated by commas nor one of "
                          f"{', '.join(CURVES)} (with '+base', e.g. sine+0.5)")
    base = _numbers(base_text, field)[0] if base_text.strip() else 0.0
    steps = [i / (count - 1) for i in range(count)]
    curve = {"sine": [math.sin(math.pi * s / 2) for s in steps], "linear": steps, "zeros": [0.0] * count}
    curve["cosine"], curve["reverse_linear"] = curve["sine"][::-1], steps[::-1]
    return [w + base for w in curve[name.strip()]]


def lr_weights(arch: str, down: str, mid: str, up: str, threshold: float) -> list[float] | None:
    """Each block's learning-rate multiplier (None: no block weights): missing ones are 1, extra
    ones dropped, and a weight at or below ``threshold`` is 0 (the block is not trained)."""
    if not (down or mid or up):
        return None
    side, n_mid, _ = sizes(arch)
    out = []
    for field, text, count in (("down_lr_weight", down, side), ("mid_lr_weight", mid, n_mid),
                               ("up_lr_weight", up, side)):
        weights = _side_weights(text, field, count) if field != "mid_lr_weight" and text else \
            _numbers(text, field) if text else []
        weights = (weights + [1.0] * count)[:count]
        out += [w if w > threshold or not text else 0.0 for w in weights]
    return [1.0, *out, 1.0] if _layout(arch)[2] else out


def _per_block(text: str, field: str, kind: type, total: int, arch: str) -> list[float]:
    values = _numbers(text, field, kind)
    if len(values) != total:
        raise ConfigError(f"network.{field}: {len(values)} values; {arch}'s UNet has {total} blocks (SD1 and SD2: 25, "
                          "SDXL: 23), give one for each")
    return values


def block_ranks(arch: str, texts: dict[str, str], rank: int, alpha: float, conv_rank: int | None,
                conv_alpha: float | None, weights: list[float] | None) -> dict[str, list[float] | None]:
    """Each block's rank and alpha, for the 1x1/linear layers and the 3x3 convolutions
    ({"block_dims": [...], "block_alphas": [...], "conv_block_dims": [...] or None, ...}), from
    ``texts`` (the DIM_FIELDS as given; empty: the network's own values); a block whose learning
    rate weight is 0 gets rank 0 (no module)."""
    total = sizes(arch)[2]
    conv_alpha = conv_alpha if conv_alpha is not None else alpha
    out: dict[str, list[float] | None] = {
        "block_dims": _per_block(texts["block_dims"], "block_dims", int, total, arch) if texts["block_dims"]
        else [rank] * total,
        "block_alphas": _per_block(texts["block_alphas"], "block_alphas", float, total, arch)
        if texts["block_alphas"] else [alpha] * total,
        "conv_block_dims": None, "conv_block_alphas": None}
    if texts["conv_block_dims"] or conv_rank is not None:
        out["conv_block_dims"] = _per_block(texts["conv_block_dims"], "conv_block_dims", int, total, arch) \
            if texts["conv_block_dims"] else [conv_rank] * total
        out["conv_block_alphas"] = _per_block(texts["conv_block_alphas"], "conv_block_alphas", float, total, arch) \
            if texts["conv_block_alphas"] else [conv_alpha] * total
    for i, w in enumerate(weights or []):
        if w == 0:
            for key in ("block_dims", "conv_block_dims"):
                if out[key] is not None:
                    out[key][i] = 0  # type: ignore[index]
    return out


def configured(net: Any) -> bool:
    """Whether a network config (:class:`~lora_trainer.config.NetworkConfig`) sets block weights or ranks."""
    return any(getattr(net, f) for f in (*LR_FIELDS, *DIM_FIELDS))


def network_weights(arch: str, net: Any) -> list[float] | None:
    """The block learning-rate weights of a network config on ``arch`` (None: none set)."""
    return lr_weights(arch, *(getattr(net, f) for f in LR_FIELDS), net.block_lr_zero_threshold)
