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
from peft.tuners.lokr.layer import LoKrLayer, factorization
from torch import nn

from lora_trainer.errors import LoraFormatError
from lora_trainer.lora.dora import ADAPTER, ColumnDora
from lora_trainer.lora.mha import LoraMultiheadAttention

LYCORIS_LAYERS = (LoHaLayer, LoKrLayer)
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# Parameter-name fragments of every adapter kind (what trains; everything else stays frozen).
ADAPTER_PARAM_MARKS = ("lora_", "hada_", "lokr_", "dora_scale")


def peft_config(kind: str, r: int, alpha: float, targets: list[str], rank_pattern: dict[str, int],
                alpha_pattern: dict[str, float], dropout: float, lokr: tuple[int, bool] = (-1, False),
                dropouts: tuple[float, float] = (0.0, 0.0)) -> Any:
    """The peft config that puts ``kind`` layers on ``targets`` (DoRA: plain LoRA, wrapped after);
    ``lokr``: LoKr's (factor, decompose_both); ``dropouts``: (rank, module) dropout, peft's own
    for LoHa and LoKr (LoRA's are kohya's, added by :func:`kohya_dropouts`)."""
    if kind in ("lora", "dora"):
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                          rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True)
    rank_dropout, module_dropout = dropouts
    if kind == "loha":
        return LoHaConfig(r=r, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern, init_weights=True, rank_dropout=rank_dropout,
                          module_dropout=module_dropout)
    # peft before 0.14 always scales LoKr's kept rows up (as LoHa's); later only when asked
    scale = {"rank_dropout_scale": True} if "rank_dropout_scale" in LoKrConfig.__dataclass_fields__ else {}
    return LoKrConfig(r=r, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                      init_weights=True, decompose_factor=lokr[0], decompose_both=lokr[1], rank_dropout=rank_dropout,
                      module_dropout=module_dropout, **scale)


# The attribute that marks a LoRA layer with kohya's rank or module dropout: (rank, module).
DROPOUT_MARK = "lora_trainer_dropouts"


def _module_dropout(p: float, layer: nn.Module, args: Any) -> None:
    """Before a LoRA layer runs: while training, leave its update out with probability ``p`` (as
    kohya: its weights get no gradient from this pass); otherwise keep it."""
    layer._disable_adapters = bool(layer.training and float(torch.rand(1)) < p)


def _module_dropout_done(layer: nn.Module, args: Any, out: Any) -> None:
    layer._disable_adapters = False


def _rank_dropout(p: float, down: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
    """After a LoRA layer's down projection: while training, zero each rank of each sample with
    probability ``p`` and scale the others by 1 / (1 - p), as kohya does."""
    if not down.training:
        return None
    batch, rank = out.shape[0], (out.shape[-1] if isinstance(down, nn.Linear) else out.shape[1])
    keep = (torch.rand((batch, rank), device=out.device) > p).to(out.dtype)
    ones = [1] * (out.dim() - 2)
    keep = keep.view(batch, *ones, rank) if isinstance(down, nn.Linear) else keep.view(batch, rank, *ones)
    return out * keep * (1.0 / (1.0 - p))


def kohya_dropouts(root: nn.Module, rank_dropout: float, module_dropout: float) -> int:
    """kohya's rank and module dropout (networks.lora) on the peft LoRA layers of ``root``; how
    many layers got them. The hooks go with the layers when the network is removed."""
    from peft.tuners.lora import LoraLayer

    if not (rank_dropout or module_dropout):
        return 0
    layers = [m for m in root.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    for m in layers:
        setattr(m, DROPOUT_MARK, (rank_dropout, module_dropout))
        if module_dropout:
            m.register_forward_pre_hook(functools.partial(_module_dropout, module_dropout))
            m.register_forward_hook(_module_dropout_done)
        if rank_dropout:
            m.lora_A[ADAPTER].register_forward_hook(functools.partial(_rank_dropout, rank_dropout))
    return len(layers)


def _pair_or_whole(t: dict[str, torch.Tensor], whole: str) -> tuple[tuple[int, int], bool]:
    """(rows, columns) of LoKr factor ``whole`` ("lokr_w1") in a file, and whether it is whole."""
    if whole in t:
        return (int(t[whole].shape[0]), int(t[whole].shape[1])), True
    return (int(t[f"{whole}_a"].shape[0]), int(t[f"{whole}_b"].shape[1])), False


def _lokr_builds(factor: int, both: bool, r: int, out_dim: int, in_dim: int) -> tuple[tuple[int, int], bool, bool]:
    """What peft's LoKr builds for a layer: lokr_w1's (rows, columns), whether w1 and w2 are whole."""
    (out_l, out_k), (in_m, in_n) = factorization(out_dim, factor), factorization(in_dim, factor)
    return (out_l, in_m), not (both and r < max(out_l, in_m) / 2), r >= max(out_k, in_n) / 2


def lokr_file_settings(path: str, files: dict[str, dict[str, torch.Tensor]], ranks: dict[str, int | None],
                       dims: dict[str, tuple[int, int]]) -> tuple[int, bool, dict[str, int]]:
    """The LoKr settings that rebuild a file's modules: (factor, decompose_both, rank per module).

    ``files`` holds each module's file tensors, ``ranks`` its rank in the file (None: two whole
    factors, which need a rank of at least half of each factor's size) and ``dims`` its layer's
    (out, in). LyCORIS and peft split each size the same way for a factor up to its square root,
    so every file trained here or by LyCORIS with such a factor (or -1) is rebuilt; one whose
    factors follow no single factor raises :class:`LoraFormatError` naming a module."""
    w1 = {k: _pair_or_whole(t, "lokr_w1") for k, t in files.items()}
    w2_whole = {k: "lokr_w2" in t for k, t in files.items()}
    both = not all(whole for _, whole in w1.values())
    rank = {k: ranks[k] or max(*w1[k][0], *files[k]["lokr_w2"].shape[:2]) for k in files}

    def fits(f: int, k: str) -> bool:
        return _lokr_builds(f, both, rank[k], *dims[k]) == (w1[k][0], w1[k][1], w2_whole[k])

    candidates = [-1, *sorted({d for shape, _ in w1.values() for d in shape})]
    factor = next((f for f in candidates if all(fits(f, k) for k in files)), None)
    if factor is None:
        key = next(k for k in files if not fits(-1, k))
        raise LoraFormatError(f"{path}: its LoKr factors (lokr_w1 {w1[key][0][0]}x{w1[key][0][1]} on {key}, a "
                              f"{dims[key][0]}x{dims[key][1]} layer, ...) follow no single factor this trainer's LoKr "
                              "can rebuild; it cannot be loaded here")
    return factor, both, rank


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
    (without touching the random state a training run is seeded with), on the CPU whatever the
    default device (the memory estimate injects on meta)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), torch.device("cpu"):
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
