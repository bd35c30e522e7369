"""Which modules get a LoRA: kohya's defaults per trainable root, or the user's name patterns.

Module paths are returned relative to the root (``bundle.trainable_roots()[key]``), in the root's
own naming (diffusers or LDM/SGM for the UNet, HF CLIP or open_clip for text encoders). The kohya
converter (:mod:`lora_trainer.lora.kohya`) turns them into file keys.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from lora_trainer.errors import ConfigError

if TYPE_CHECKING:
    from lora_trainer.config import NetworkConfig
    from lora_trainer.families.base import Family

# Inside every transformer block of the UNet (same names in diffusers and LDM/SGM code).
UNET_BLOCK_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                      "ff.net.0.proj", "ff.net.2")
# proj_in / proj_out of the spatial transformer: 1x1 conv in SD1, Linear in SD2/SDXL.
UNET_TRANSFORMER_TARGETS = ("proj_in", "proj_out")

_HF_CLIP_RE = re.compile(r"(?:^|\.)encoder\.layers\.\d+\.(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$")
# open_clip: the whole nn.MultiheadAttention (q, k, v and out projections) plus the MLP.
_OPEN_CLIP_RE = re.compile(r"(?:^|\.)resblocks\.\d+\.(?:attn|mlp\.c_fc|mlp\.c_proj)$")

ADAPTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


def _is_adaptable(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    # out_proj of nn.MultiheadAttention is never called as a module: adapt the MHA instead.
    if type(module).__name__ == "NonDynamicallyQuantizableLinear":
        return False
    return isinstance(module, (nn.Linear, nn.Conv2d))


def default_unet_targets(unet: nn.Module) -> list[str]:
    """kohya's default UNet targets: Linear/1x1 layers inside spatial transformers."""
    modules = dict(unet.named_modules())
    out: list[str] = []
    for path, module in modules.items():
        blocks = getattr(module, "transformer_blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            continue
        base = f"{path}." if path else ""
        for name in UNET_TRANSFORMER_TARGETS:
            if f"{base}{name}" in modules and _is_adaptable(modules[f"{base}{name}"]):
                out.append(f"{base}{name}")
        for i in range(len(blocks)):
            for name in UNET_BLOCK_TARGETS:
                full = f"{base}transformer_blocks.{i}.{name}"
                if full in modules and _is_adaptable(modules[full]):
                    out.append(full)
    return sorted(out, key=_natural_key)


# ResNet blocks and samplers (diffusers and LDM/SGM class names): LoCon's extra targets.
CONV_BLOCK_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D", "ResBlock", "Downsample", "Upsample")


def _inside(unet: nn.Module, classes: tuple[str, ...]) -> list[str]:
    """Every adaptable layer inside a module whose class is one of ``classes``."""
    out: list[str] = []
    for path, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        base = f"{path}." if path else ""
        out += [base + n for n, m in module.named_modules() if n and _is_adaptable(m)]
    return out


def conv_block_targets(unet: nn.Module) -> list[str]:
    """kohya's LoCon targets beyond the defaults: every Linear/Conv2d inside the ResNet blocks and
    the down/up samplers (3x3 convs get conv_dim; time embedding and 1x1 shortcut the rank)."""
    return sorted(dict.fromkeys(_inside(unet, CONV_BLOCK_CLASSES)), key=_natural_key)


# LyCORIS' presets (its network_args ``preset=``), for the SD1/SD2/SDXL UNet and CLIP text encoders.
# unet: the parts adapted ("transformer": kohya's defaults, "attention": their attn1/attn2
# projections only, "resnets", "samplers", "io": conv_in and conv_out, "time": the time
# embedding); text: "attn-mlp" (kohya's defaults), "attention" or None (no text-encoder layer);
# convs: whether 3x3 convolutions are adapted (LyCORIS' enable_conv; 1x1 ones always are).
@dataclass(frozen=True)
class Preset:
    unet: tuple[str, ...]
    text: str | None
    convs: bool


_WHOLE_UNET = ("transformer", "resnets", "samplers", "io", "time")
PRESETS = {
    "full": Preset(_WHOLE_UNET, "attn-mlp", True),
    "full-lin": Preset(("transformer", "resnets", "time"), "attn-mlp", False),
    "attn-mlp": Preset(("transformer",), "attn-mlp", False),
    "attn-only": Preset(("attention",), "attention", False),
    "unet-only": Preset(_WHOLE_UNET, None, True),
    "unet-transformer-only": Preset(("transformer",), None, False),
    "unet-convblock-only": Preset(("resnets", "samplers", "io"), None, True),
}
# Single layers a preset names: (diffusers path, LDM/SGM path).
_NAMED_LAYERS = {"io": (("conv_in", "input_blocks.0.0"), ("conv_out", "out.2")),
                 "time": (("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"))}
_CLASSES = {"resnets": ("ResnetBlock2D", "ResBlock"), "samplers": ("Downsample2D", "Upsample2D", "Downsample", "Upsample")}
_ATTENTION_RE = re.compile(r"(?:^|\.)attn[12]\.")
_TEXT_ATTENTION_RE = re.compile(r"(?:^|\.)(?:self_attn\.[a-z_]+|attn)$")


def convs_adapted(net: NetworkConfig) -> bool:
    """Whether a run adapts the UNet's 3x3 convolutions: its preset's choice, else (kohya's
    targets) with locon, conv_rank or conv_block_dims."""
    if net.lycoris_preset != "kohya":
        return PRESETS[net.lycoris_preset].convs
    return net.type == "locon" or net.conv_rank is not None or bool(net.conv_block_dims)


def check_preset(name: str, arch: str, text_encoder: bool, unet: bool) -> None:
    """ConfigError where preset ``name`` cannot run: on a model without a kohya UNet (``unet``
    false; ``arch`` names it), or with a trained text encoder where it adapts none."""
    if not unet:
        raise ConfigError(f"network.lycoris_preset: {name}: LyCORIS' presets are for the SD1, SD2 and SDXL UNet, "
                          f"not {arch}; set it to kohya")
    if text_encoder and PRESETS[name].text is None:
        raise ConfigError(f"network.lycoris_preset: {name} adapts no text-encoder layer; set "
                          "network.train_text_encoder to false or choose a preset without 'unet-'")


def preset_unet_targets(unet: nn.Module, preset: Preset) -> list[str]:
    """The UNet layers ``preset`` adapts, in the UNet's own naming (diffusers or LDM/SGM)."""
    modules = dict(unet.named_modules())
    out: list[str] = []
    for part in preset.unet:
        if part in ("transformer", "attention"):
            paths = default_unet_targets(unet)
            out += paths if part == "transformer" else [p for p in paths if _ATTENTION_RE.search(p)]
        elif part in _CLASSES:
            out += _inside(unet, _CLASSES[part])
        else:
            out += [p for pair in _NAMED_LAYERS[part] for p in pair if p in modules and _is_adaptable(modules[p])]
    if not preset.convs:
        out = [p for p in out if not is_spatial_conv(modules[p])]
    return sorted(dict.fromkeys(out), key=_natural_key)


def preset_text_targets(encoder: nn.Module, naming: str, preset: Preset) -> list[str]:
    """The text-encoder layers ``preset`` adapts: kohya's defaults, or their attention only."""
    paths = default_text_targets(encoder, naming) if preset.text else []
    return [p for p in paths if _TEXT_ATTENTION_RE.search(p)] if preset.text == "attention" else paths


def is_spatial_conv(module: nn.Module) -> bool:
    """A convolution with a kernel larger than 1x1 (gets conv_rank/conv_alpha)."""
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def default_text_targets(encoder: nn.Module, naming: str) -> list[str]:
    """kohya's default text-encoder targets: attention projections and MLP of every layer."""
    regex = _OPEN_CLIP_RE if naming == "open_clip" else _HF_CLIP_RE
    # An open_clip model that still has its image tower has resblocks there too: text only.
    out = [p for p, m in encoder.named_modules()
           if regex.search(p) and _is_adaptable(m) and "visual" not in p.split(".")]
    return sorted(out, key=_natural_key)


def pattern_matches(pattern: str, path: str) -> bool:
    """A user pattern matches a module path when it equals it, is a dotted suffix of it
    (``attn2.to_k``), is a glob (``*attn2*``) or a regular expression prefixed ``re:``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(path, pattern)
    return path == pattern or path.endswith("." + pattern)


def find_targets(roots: dict[str, tuple[nn.Module, str]], patterns: list[str] | None = None,
                 family: Family | None = None) -> dict[str, list[str]]:
    """{root key: module paths} for ``roots`` = {key: (module, naming)}.

    With ``patterns`` empty the kohya defaults are used; otherwise every adaptable module
    (Linear, Conv2d, MultiheadAttention) whose path matches a pattern. A pattern that matches
    nothing in any root is a ConfigError (a typo would silently train nothing).
    """
    result: dict[str, list[str]] = {}
    used: set[str] = set()
    for key, (module, naming) in roots.items():
        if not patterns:
            own = family.default_targets(key, module, naming) if family is not None else None
            if own is not None:
                paths = own
            elif key == "unet":
                paths = default_unet_targets(module)
            else:
                paths = default_text_targets(module, naming)
        else:
            paths = []
            for path, sub in module.named_modules():
                hits = [p for p in patterns if path and pattern_matches(p, path)]
                if hits and _is_adaptable(sub):
                    paths.append(path)
                    used.update(hits)
            paths.sort(key=_natural_key)
        result[key] = paths
    if patterns:
        unused = [p for p in patterns if p not in used]
        if unused:
            raise ConfigError(
                f"network.target_modules: {unused[0]!r} matches no Linear/Conv2d/attention module in "
                f"{', '.join(roots)}; use a module name such as 'attn2.to_k', a glob or 're:<regex>'"
            )
    return result


def _natural_key(path: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]
