"""The adapter kinds on peft's layers: which config injects them, and their tensors by file name.

* LoRA / LoCon: ``peft.LoraConfig`` (LoCon only adds the 3x3 convolutions as targets, with
  their own rank and alpha through ``rank_pattern``/``alpha_pattern``).
* DoRA: ``peft.LoraConfig`` plus :class:`~lora_trainer.lora.dora.ColumnDora` (see its module
  for why not peft's ``use_dora``).
* LoHa: ``peft.LoHaConfig``; LoKr: ``peft.LoKrConfig``. Their parameter names are LyCORIS'
  (``hada_w1_a``, ``lokr_w1``...), the names the loaders read, with the same orientation.

All of these exist in peft 0.13.2 (what the A1111 installer adds) and 0.21. One difference is
shimmed: peft < 0.14 leaves LoKr's alpha / rank out of the update (it was fixed in 0.14), so
:func:`fix_lokr_scaling` scales it the way the loaders do.

Scaling in the file: loaders use alpha / rank, the rank being the inner size of a low-rank pair
(``lora_down``, ``hada_w1_b``, ``lokr_w1_b``/``lokr_w2_b``). A LoKr module with two whole
factors has no such rank and loaders use scale 1, so :func:`file_factors` folds alpha / rank
into ``lokr_w1`` there.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.loha.layer import LoHaLayer
from peft.tuners.lokr.layer import LoKrLayer
from torch import nn

from lora_trainer.lora.dora import ADAPTER, ColumnDora
from lora_trainer.lora.mha import LoraMultiheadAttention

LYCORIS_LAYERS = (LoHaLayer, LoKrLayer)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Parameter-name fragments of every adapter kind (what trains; everything else stays frozen).
ADAPTER_PARAM_MARKS = ("lora_", "hada_", "lokr_", "dora_scale")


def peft_config(kind: str, r: int, alpha: float, targets: list[str], rank_pattern: dict[str, int],
                alpha_pattern: dict[str, float], dropout: float) -> Any:
    """The peft config that puts ``kind`` layers on ``targets`` (DoRA: plain LoRA, wrapped after)."""
    if kind in ("lora", "dora"):
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True)
    cls = LoHaConfig if kind == "loha" else LoKrConfig
    return cls(r=r, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
               init_weights=True)


def wrap_dora(root: nn.Module, paths: list[str]) -> None:
    """Replace each peft LoRA layer at ``paths`` by a :class:`ColumnDora` around it."""
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = root.get_submodule(parent) if parent else root
        setattr(owner, child, ColumnDora(getattr(owner, child)))


def _raw(m: nn.Module, part: str) -> dict[str, nn.Parameter]:
    if isinstance(m, LoraMultiheadAttention):
        return {"lora_down.weight": m.lora_down[part].weight, "lora_up.weight": m.lora_up[part].weight}
    if isinstance(m, ColumnDora):
        return {**_raw(m.lora, part), "dora_scale": m.dora_scale}
    if isinstance(m, LoHaLayer):
        return {n: getattr(m, n)[ADAPTER] for n in _LOHA}
    if isinstance(m, LoKrLayer):
        return {n: getattr(m, n)[ADAPTER] for n in _LOKR if ADAPTER in getattr(m, n)}
    return {"lora_down.weight": m.lora_A[ADAPTER].weight, "lora_up.weight": m.lora_B[ADAPTER].weight}


def adapter_tensors(m: nn.Module, part: str = "") -> dict[str, nn.Parameter]:
    """The trained parameters of one module, by their file tensor name."""
    return _raw(m, part)


def _lora_layer(m: nn.Module) -> nn.Module:
    return m.lora if isinstance(m, ColumnDora) else m


def rank_of(m: nn.Module, part: str = "") -> int:
    if isinstance(m, LoraMultiheadAttention):
        return int(m.lora_down[part].weight.shape[0])
    if isinstance(m, LYCORIS_LAYERS):
        return int(m.r[ADAPTER])
    return int(_lora_layer(m).r[ADAPTER])


def alpha_of(m: nn.Module, part: str = "") -> float:
    if isinstance(m, LoraMultiheadAttention):
        return float(m.alphas[part])
    if isinstance(m, LYCORIS_LAYERS):
        return float(m.alpha[ADAPTER])
    return float(_lora_layer(m).lora_alpha[ADAPTER])


def set_alpha(m: nn.Module, part: str, alpha: float, multiplier: float) -> None:
    if isinstance(m, LoraMultiheadAttention):
        m.alphas[part] = alpha
    elif isinstance(m, LYCORIS_LAYERS):
        m.alpha[ADAPTER] = alpha
    else:
        _lora_layer(m).lora_alpha[ADAPTER] = alpha
    set_strength(m, multiplier)


def set_strength(m: nn.Module, multiplier: float) -> None:
    """Scale the module's update by ``multiplier`` (0 off, 1 as trained)."""
    if isinstance(m, (LoraMultiheadAttention, ColumnDora)):
        m.multiplier = multiplier
        if isinstance(m, ColumnDora):
            m.lora.set_scale(ADAPTER, 1.0)  # DoRA blends the whole W' instead
    else:
        m.set_scale(ADAPTER, multiplier)


def file_factors(m: nn.Module, part: str = "") -> dict[str, float]:
    """Factors the file's tensors carry beyond the trained parameters (see the module doc)."""
    if isinstance(m, LoKrLayer) and not (ADAPTER in m.lokr_w1_b or ADAPTER in m.lokr_w2_b):
        return {"lokr_w1": alpha_of(m) / rank_of(m)}
    return {}


def _scaled_lokr_delta(self: LoKrLayer, adapter_name: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(self).get_delta_weight(self, adapter_name, *args, **kwargs) * self.scaling[adapter_name]


@functools.cache
def peft_scales_lokr() -> bool:
    """Whether this peft's LoKr update includes alpha / rank (0.14 and later), found by trying
    (without touching the random state a training run is seeded with)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = nn.Sequential(nn.Linear(4, 4))
        inject_adapter_in_model(LoKrConfig(r=1, alpha=2.0, target_modules=["0"]), model, adapter_name=ADAPTER)
        layer = model[0]
        for p in adapter_tensors(layer).values():
            p.fill_(1.0)
        return bool(layer.get_delta_weight(ADAPTER).max() == 2.0)


def fix_lokr_scaling(root: nn.Module) -> int:
    """On a peft without LoKr scaling, make each LoKr layer's update include alpha / rank (per
    instance: the layers are thrown away on removal). Returns how many layers needed it."""
    layers = [m for m in root.modules() if isinstance(m, LoKrLayer)]
    if not layers or peft_scales_lokr():
        return 0
    for m in layers:
        m.get_delta_weight = types.MethodType(_scaled_lokr_delta, m)
    return len(layers)
