"""Put adapter layers into a ModelBundle (peft), read them out as kohya tensors, take them out again.

The layers are of ``network.type``: LoRA/LoCon, DoRA, LoHa or LoKr (see :mod:`variants`).

Linear and Conv2d layers get peft's LoRA layers (``inject_adapter_in_model`` with an explicit
list of full module paths); ``nn.MultiheadAttention`` gets :class:`LoraMultiheadAttention` (see
its module for why peft's MHA layer is not used). ``LoraNetwork.remove()`` puts the very same
module objects back and restores every ``requires_grad`` flag, so a live WebUI model can be
trained in place.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from peft import inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.errors import ConfigError, HostError, LoraFormatError
from lora_trainer.lora import blocks, kohya, kohya_tensors, variants
from lora_trainer.lora.kohya import Slot
from lora_trainer.lora.kohya_tensors import ModuleTensors
from lora_trainer.lora.mha import LoraMultiheadAttention
from lora_trainer.lora.targets import (
    PRESETS,
    _is_adaptable,
    check_preset,
    conv_block_targets,
    convs_adapted,
    find_targets,
    is_spatial_conv,
    preset_text_targets,
    preset_unet_targets,
)
from lora_trainer.models.bundle import ModelBundle

ADAPTER = variants.ADAPTER


@dataclass
class _RootState:
    """What a root looked like before injection, to restore it exactly."""

    module: nn.Module
    originals: dict[str, nn.Module]  # module path -> original module object that was replaced
    requires_grad: dict[str, bool]
    attrs: set[str]
    trainable: bool
    # attributes injection added to the root (only these are deleted on removal: the model may gain
    # its own attributes while training, e.g. transformers' output-capturing hook flags)
    added: set[str] = field(default_factory=set)


def _split(path: str) -> tuple[str, str]:
    parent, _, child = path.rpartition(".")
    return parent, child


class LoraNetwork:
    """The adapter layers of one bundle, addressed by kohya key; ``kind`` is lora, dora, loha or
    lokr (:data:`kohya_tensors.TYPE_KIND`) and says which tensors each module has in the file."""

    def __init__(self, arch: str, layout: dict[str, Slot], roots: dict[str, _RootState], kind: str = "lora",
                 lokr: tuple[int, bool] = (-1, False)) -> None:
        self.arch = arch
        self.layout = layout
        self.kind = kind
        self.lokr = lokr  # LoKr's (factor, decompose_both) as built (with init_from: the file's)
        self.lr_weights: dict[str, float] = {}  # learning-rate multiplier by kohya key (block weights); 1 if absent
        self._roots = roots
        self._multiplier = 1.0
        self._removed = False

    # --- access ---------------------------------------------------------------------------
    def _module(self, slot: Slot) -> nn.Module:
        return self._roots[slot.root].module.get_submodule(slot.path)

    def tensors(self, key: str) -> dict[str, nn.Parameter]:
        """The trained parameters of module ``key`` by file tensor name (lora_down.weight, ...)."""
        slot = self.layout[key]
        return variants.adapter_tensors(self._module(slot), slot.part)

    def rank(self, key: str) -> int:
        slot = self.layout[key]
        return variants.rank_of(self._module(slot), slot.part)

    def alpha(self, key: str) -> float:
        slot = self.layout[key]
        return variants.alpha_of(self._module(slot), slot.part)

    def _set_alpha(self, key: str, alpha: float) -> None:
        slot = self.layout[key]
        variants.set_alpha(self._module(slot), slot.part, alpha, self._multiplier)

    @property
    def network_dim(self) -> int:
        """The most common rank (what ss_network_dim reports; from the file with init_from)."""
        return Counter(self.rank(k) for k in self.layout).most_common(1)[0][0]

    @property
    def network_alpha(self) -> float:
        """The most common alpha (ss_network_alpha)."""
        return Counter(self.alpha(k) for k in self.layout).most_common(1)[0][0]

    def parameters(self, root: str | None = None) -> list[nn.Parameter]:
        """Adapter parameters (fp32) of the trainable roots, or of ``root`` only."""
        out: list[nn.Parameter] = []
        for key, slot in self.layout.items():
            if (root is None and self._roots[slot.root].trainable) or slot.root == root:
                out.extend(self.tensors(key).values())
        return out

    def param_groups(self, unet_lr: float, te_lr: float, up_ratio: float | None = None) -> list[dict]:
        """The optimizer's groups: the UNet's adapters and the text encoders', each at its
        learning rate; with ``up_ratio`` (LoRA+) each part's up matrices (``lora_up``) in a group
        of their own at ``up_ratio`` times that rate."""
        groups = []
        for part, lr, roots in (("unet", unet_lr, ["unet"]),
                                ("text_encoder", te_lr, [r for r in self._roots if r != "unet"])):
            by_weight: dict[float, list[tuple[str, nn.Parameter]]] = {}
            for key, slot in self.layout.items():
                if slot.root in roots and self._roots[slot.root].trainable:
                    by_weight.setdefault(self.lr_weights.get(key, 1.0), []).extend(self.tensors(key).items())
            # weight 1 first, then the largest: the first group's rate is the one the run reports
            for weight in sorted(by_weight, key=lambda w: (w != 1.0, -w)):
                name = part if weight == 1.0 else f"{part}_x{weight:g}"
                params = by_weight[weight]
                is_up = [up_ratio is not None and file_name.startswith("lora_up") for file_name, _ in params]
                up = [p for (_, p), u in zip(params, is_up, strict=True) if u]
                rest = [p for (_, p), u in zip(params, is_up, strict=True) if not u]
                if rest:
                    groups.append({"params": rest, "lr": lr * weight, "name": name, "lr_scale": weight})
                if up:
                    groups.append({"params": up, "lr": lr * weight * up_ratio, "name": f"{name}_lora_up",
                                   "lr_scale": weight * up_ratio})
        return groups

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """kohya's scale_weight_norms, after an optimizer step: each module whose update
        (up @ down * alpha / rank) has a Frobenius norm above ``max_norm`` gets both matrices
        scaled by sqrt(max_norm / norm), which brings it to ``max_norm``. Returns (modules scaled,
        the largest norm after) as tensors, so the step does not wait for the device."""
        scaled, largest = [], []
        for key in self.layout:
            t = self.tensors(key)
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            norm = (up.flatten(1) @ down.flatten(1)).norm() * (self.alpha(key) / self.rank(key))
            ratio = (max_norm / norm.clamp(min=max_norm)).sqrt()  # 1 where the norm is within
            down.mul_(ratio)
            up.mul_(ratio)
            scaled.append(norm > max_norm)
            largest.append(norm.clamp(max=max_norm))
        return torch.stack(scaled).sum(), torch.stack(largest).max()

    # --- kohya ----------------------------------------------------------------------------
    def modules(self, fold: bool = True) -> dict[str, ModuleTensors]:
        """Every module as the file holds it (``fold=False``: the trained parameters as they are,
        for exact checkpoints; see :func:`variants.file_factors`)."""
        out = {}
        for key, slot in self.layout.items():
            m = self._module(slot)
            factors = variants.file_factors(m, slot.part) if fold else {}
            tensors = {n: p.detach() * factors[n] if n in factors else p.detach()
                       for n, p in variants.adapter_tensors(m, slot.part).items()}
            out[key] = ModuleTensors(self.kind, tensors, variants.alpha_of(m, slot.part))
        return out

    def to_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        """The tensors of the LoRA file (the family's file layers: Flux/SD3 fuse q/k/v)."""
        return _file_side(self.arch, kohya_tensors.write_modules(self.modules(), dtype), to_file=True)

    def load_kohya(self, tensors: dict[str, torch.Tensor], fold: bool = True) -> None:
        """Copy file tensors into the adapter layers; every key must match, with the same shapes."""
        incoming = kohya_tensors.read_modules(_file_side(self.arch, tensors, to_file=False))
        unknown = [k for k in incoming if k not in self.layout]
        if unknown:
            raise LoraFormatError(f"LoRA key {unknown[0]!r} matches no LoRA module of this model "
                                  f"({len(unknown)} unmatched); is it for another architecture?")
        missing = [k for k in self.layout if k not in incoming]
        if missing:
            raise LoraFormatError(f"LoRA module {missing[0]!r} is missing from the tensors ({len(missing)} missing)")
        for key, w in incoming.items():
            have = self.tensors(key)
            if w.kind != self.kind or set(w.tensors) != set(have):
                raise LoraFormatError(f"LoRA module {key!r} has {w.kind} tensors {sorted(w.tensors)}; this "
                                      f"{self.kind} network needs {sorted(have)}")
            for name, p in have.items():
                if tuple(p.shape) != tuple(w.tensors[name].shape):
                    raise LoraFormatError(f"LoRA tensor {key}.{name} has shape {tuple(w.tensors[name].shape)}, "
                                          f"the model needs {tuple(p.shape)}")
        with torch.no_grad():
            for key, w in incoming.items():
                self._set_alpha(key, w.alpha)
                slot = self.layout[key]
                factors = variants.file_factors(self._module(slot), slot.part) if fold else {}
                for name, p in self.tensors(key).items():
                    p.copy_(w.tensors[name] / factors[name] if name in factors else w.tensors[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 copy of every adapter tensor (kohya keys, nothing folded) for training checkpoints."""
        return {k: v.clone() for k, v in kohya_tensors.write_modules(self.modules(fold=False), torch.float32).items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.load_kohya(sd, fold=False)

    # --- strength and removal -------------------------------------------------------------
    def set_scale(self, w: float) -> None:
        """Multiply every LoRA delta by ``w`` (0 turns the LoRA off, 1 is the trained strength)."""
        self._multiplier = float(w)
        for slot in self.layout.values():
            variants.set_strength(self._module(slot), self._multiplier)

    def remove(self) -> None:
        """Take every LoRA layer out: the original module objects go back where they were and
        every parameter gets back its ``requires_grad``; attributes peft added are deleted."""
        if self._removed:
            return
        for state in self._roots.values():
            for path, original in state.originals.items():
                parent, child = _split(path)
                setattr(state.module.get_submodule(parent) if parent else state.module, child, original)
            for name, p in state.module.named_parameters():
                if name in state.requires_grad:
                    p.requires_grad_(state.requires_grad[name])
            for attr in state.added & set(vars(state.module)):
                delattr(state.module, attr)
        self._removed = True


def _file_side(arch: str, tensors: dict[str, torch.Tensor], to_file: bool) -> dict[str, torch.Tensor]:
    """Module tensors -> file tensors (``to_file``) or back, as the family ``arch`` stores them."""
    from lora_trainer.families import family_names, get_family

    if arch not in family_names():
        return tensors
    family = get_family(arch)
    return family.file_tensors(tensors) if to_file else family.module_tensors(tensors)


def _module_paths(root: nn.Module, paths: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    mods = dict(root.named_modules())
    return [(p, kohya.MHA_PARTS if isinstance(mods[p], nn.MultiheadAttention) else ("",)) for p in paths]


def _candidate_layout(arch: str, roots: dict[str, tuple[nn.Module, str]]) -> dict[str, Slot]:
    """Every adaptable module of ``roots`` that has a kohya name: resolves keys of a file."""
    targets = {}
    for key, (module, naming) in roots.items():
        paths = []
        for path, sub in module.named_modules():
            if not path or not _is_adaptable(sub):
                continue
            try:
                kohya.kohya_name(arch, key, naming, path, "q" if isinstance(sub, nn.MultiheadAttention) else "")
            except LoraFormatError:
                continue
            paths.append(path)
        targets[key] = (naming, _module_paths(module, paths))
    return kohya.build_layout(arch, targets)


def _exact_pattern(path: str) -> str:
    """A peft rank/alpha pattern that matches the module at ``path`` and no other.

    peft matches a pattern P as ``(.*\\.)?(P)$``; before 0.14 (the version installed in the A1111
    WebUI) as ``.*\\.P$``, which needs a dot before P, so the escaped full path never matches. The
    first segment goes into a fixed-width lookbehind instead, which both forms accept."""
    first, _, rest = path.partition(".")
    if not rest:
        return re.escape(path)
    return f"(?<=^{re.escape(first)}\\.){re.escape(rest)}"


def _inject_root(root: nn.Module, entries: list[tuple[str, tuple[str, ...]]], ranks: dict[tuple[str, str], int],
                 alphas: dict[tuple[str, str], float], dropouts: tuple[float, float, float], trainable: bool,
                 kind: str, lokr: tuple[int, bool]) -> _RootState:
    """Put ``kind`` layers on ``root``'s ``entries``; ``dropouts``: (peft's LoRA dropout, rank
    dropout, module dropout)."""
    mods = dict(root.named_modules())
    paths = [p for p, _ in entries]
    state = _RootState(root, {p: mods[p] for p in paths},
                       {n: p.requires_grad for n, p in root.named_parameters()}, set(vars(root)), trainable)
    plain = [p for p, parts in entries if parts == ("",)]
    try:
        if plain:
            # The most common rank/alpha is the default; only the others get a pattern (peft
            # matches every pattern against every target, so patterns for all would be slow).
            r0 = Counter(ranks[(p, "")] for p in plain).most_common(1)[0][0]
            a0 = Counter(alphas[(p, "")] for p in plain).most_common(1)[0][0]
            config = variants.peft_config(
                kind, r0, a0, plain,
                rank_pattern={_exact_pattern(p): ranks[(p, "")] for p in plain if ranks[(p, "")] != r0},
                alpha_pattern={_exact_pattern(p): alphas[(p, "")] for p in plain if alphas[(p, "")] != a0},
                dropout=dropouts[0], lokr=lokr, dropouts=(dropouts[1], dropouts[2]))
            inject_adapter_in_model(config, root, adapter_name=ADAPTER)
            if kind == "lora":
                variants.kohya_dropouts(root, dropouts[1], dropouts[2])
            if kind == "dora":
                variants.wrap_dora(root, plain)
            variants.fix_lokr_scaling(root)
        for path, parts in entries:
            if parts != ("",):
                wrapper = LoraMultiheadAttention(mods[path], {q: ranks[(path, q)] for q in parts},
                                                 {q: alphas[(path, q)] for q in parts})
                parent, child = _split(path)
                setattr(root.get_submodule(parent) if parent else root, child, wrapper)
    except Exception:
        state.added = set(vars(root)) - state.attrs
        LoraNetwork("", {}, {"r": state}).remove()
        raise
    state.added = set(vars(root)) - state.attrs
    # peft froze the whole root; adapter parameters train (in fp32) only when the root is trained.
    for name, p in root.named_parameters():
        is_adapter = any(mark in name for mark in variants.ADAPTER_PARAM_MARKS)
        p.requires_grad_(is_adapter and trainable)
        if is_adapter and p.dtype != torch.float32:
            p.data = p.data.float()
    return state


def _check_init_file(path: str, kind: str, incoming: dict[str, ModuleTensors]) -> None:
    kinds = Counter(m.kind for m in incoming.values())
    if len(kinds) > 1:
        raise LoraFormatError(f"{path}: mixes module kinds ({', '.join(sorted(kinds))}); it cannot be continued")
    found = next(iter(kinds), kind)
    if found != kind:
        want = {"lora": "lora or locon"}.get(found, found)
        raise ConfigError(f"network.init_from: {path} is a {found} network; set network.type to {want}")


def _planned(bundle: ModelBundle, cfg: NetworkConfig, all_roots: dict[str, tuple[nn.Module, str]],
             trained: set[str], per_block: dict[str, list[float] | None] | None = None,
             ) -> tuple[dict[str, Slot], dict[tuple[str, str, str], int], dict[tuple[str, str, str], float]]:
    """Layout, ranks and alphas from the config: kohya's targets (or the user's), plus the ResNet
    blocks and samplers for LoCon or with conv_rank, or a LyCORIS preset's layers; 3x3 convs at
    conv_rank/conv_alpha; with ``per_block`` (:func:`_block_ranks`) the UNet's at their block's
    rank, none in a block at 0."""
    use = {k: v for k, v in all_roots.items() if k in trained}
    if cfg.lycoris_preset != "kohya":
        found = _preset_targets(bundle, cfg.lycoris_preset, use)
    else:
        found = find_targets(use, cfg.target_modules or None, bundle.family)
        if convs_adapted(cfg) and "unet" in found:
            found["unet"] = sorted(dict.fromkeys(found["unet"] + conv_block_targets(use["unet"][0])))
    targets = {k: (all_roots[k][1], _module_paths(all_roots[k][0], found[k])) for k in use}
    layout = kohya.build_layout(bundle.arch, targets)
    ranks, alphas = {}, {}
    for key, s in list(layout.items()):
        spatial = is_spatial_conv(all_roots[s.root][0].get_submodule(s.path))
        rank = (cfg.conv_rank or cfg.rank) if spatial else cfg.rank
        conv_alpha = cfg.conv_alpha if cfg.conv_alpha is not None else cfg.alpha
        alpha = float(conv_alpha if spatial else cfg.alpha)
        block = blocks.block_index(bundle.arch, key) if per_block and s.root == "unet" else None
        dims, block_alphas = ("conv_block_dims", "conv_block_alphas") if spatial else ("block_dims", "block_alphas")
        if block is not None and per_block[dims] is not None:
            rank, alpha = int(per_block[dims][block]), float(per_block[block_alphas][block])
            if rank == 0:  # a block left out (rank 0, or a learning-rate weight of 0)
                del layout[key]
                continue
        ranks[(s.root, s.path, s.part)], alphas[(s.root, s.path, s.part)] = rank, alpha
    return layout, ranks, alphas


def _preset_targets(bundle: ModelBundle, name: str, use: dict[str, tuple[nn.Module, str]]) -> dict[str, list[str]]:
    """{root key: module paths} of LyCORIS' preset ``name`` on the roots ``use``."""
    check_preset(name, bundle.arch, any(k != "unet" for k in use), bundle.family.unet_topology is not None)
    preset = PRESETS[name]
    return {k: preset_unet_targets(m, preset) if k == "unet" else preset_text_targets(m, naming, preset)
            for k, (m, naming) in use.items()}


def _block_ranks(arch: str, cfg: NetworkConfig) -> dict[str, list[float] | None] | None:
    """Each UNet block's ranks and alphas when the config sets block weights or ranks (kohya's
    networks.lora on an SD1/SD2/SDXL UNet), else None."""
    if not blocks.configured(cfg):
        return None
    if not blocks.has_blocks(arch):
        raise ConfigError(f"network: block weights and ranks are for the SD1, SD2 and SDXL UNet, not {arch}; "
                          f"leave network.{next(f for f in blocks.LR_FIELDS + blocks.DIM_FIELDS if getattr(cfg, f))} "
                          "empty")
    conv_rank = cfg.conv_rank or (cfg.rank if convs_adapted(cfg) else None)
    return blocks.block_ranks(arch, {f: getattr(cfg, f) for f in blocks.DIM_FIELDS}, cfg.rank, cfg.alpha, conv_rank,
                              cfg.conv_alpha, blocks.network_weights(arch, cfg))


def _in_out(module: nn.Module) -> tuple[int, int]:
    """A layer's (out, in) sizes as peft's LoKr splits them."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups
    return module.out_features, module.in_features


def _from_file(arch: str, path: str, all_roots: dict[str, tuple[nn.Module, str]], kind: str,
               lokr: tuple[int, bool]) -> tuple[dict[str, torch.Tensor], dict[str, Slot],
                                                dict[tuple[str, str, str], int], dict[tuple[str, str, str], float],
                                                tuple[int, bool]]:
    """A LoRA file's tensors, and the layout, ranks, alphas (and LoKr factor, decompose_both) that
    rebuild its modules."""
    from lora_trainer.lora.files import read_lora_file

    with torch.device("cpu"):  # the file's values, also where the model is built on "meta" (the estimate)
        tensors, _ = read_lora_file(path)
        tensors = _file_side(arch, tensors, to_file=False)
        incoming = kohya_tensors.read_modules(tensors)
    _check_init_file(path, kind, incoming)
    candidates = _candidate_layout(arch, all_roots)
    unknown = [k for k in incoming if k not in candidates]
    if unknown:
        raise LoraFormatError(f"{path}: LoRA key {unknown[0]!r} matches no module of this "
                              f"{arch} model ({len(unknown)} unmatched)")
    layout = {k: candidates[k] for k in sorted(incoming)}
    rank = {k: incoming[k].rank for k in layout}
    if kind == "lokr" and not any(s.part for s in layout.values()):  # open_clip's attention is refused after
        dims = {k: _in_out(all_roots[s.root][0].get_submodule(s.path)) for k, s in layout.items()}
        factor, both, rank = variants.lokr_file_settings(path, {k: incoming[k].tensors for k in layout}, rank, dims)
        lokr = (factor, both)
    ranks = {(s.root, s.path, s.part): rank[k] or 1 for k, s in layout.items()}
    alphas = {(s.root, s.path, s.part): incoming[k].alpha for k, s in layout.items()}
    return tensors, layout, ranks, alphas, lokr


def inject_lora(bundle: ModelBundle, network_cfg: NetworkConfig) -> LoraNetwork:
    """Add adapter layers of ``network_cfg.type`` to ``bundle`` in place (UNet when train_unet,
    each text encoder when train_text_encoder; with init_from, the modules and ranks/alphas of
    that file)."""
    kind = kohya_tensors.TYPE_KIND[network_cfg.type]
    all_roots = {k: (m, bundle.naming_of(k)) for k, m in bundle.trainable_roots().items()}
    for key, (module, _) in all_roots.items():
        leftover = next((n for n, m in module.named_modules()
                         if isinstance(m, (BaseTunerLayer, LoraMultiheadAttention))), None)
        if leftover is not None:
            # Injecting again would silently skip these layers (they are no longer Linear).
            raise HostError(f"the {key} model already has LoRA layers ({leftover}) from a run that did not "
                            "finish; reload the model before training again")
    trained = {k for k in all_roots if (k == "unet" and network_cfg.train_unet)
               or (k != "unet" and network_cfg.train_text_encoder)}
    init_tensors: dict[str, torch.Tensor] | None = None
    lokr = (network_cfg.lokr_factor, network_cfg.lokr_decompose_both)
    per_block = _block_ranks(bundle.arch, network_cfg)
    if network_cfg.init_from:
        init_tensors, layout, ranks, alphas, lokr = _from_file(bundle.arch, network_cfg.init_from, all_roots, kind,
                                                               lokr)
    else:
        layout, ranks, alphas = _planned(bundle, network_cfg, all_roots, trained, per_block)
    if not layout:
        raise ConfigError("network: no module to put a LoRA on; enable network.train_unet or "
                          "network.train_text_encoder, or check network.target_modules")
    fused = next((layer for k in layout if (layer := bundle.family.fused_file_layer(k))), None)
    if kind != "lora" and fused is not None:
        raise ConfigError(f"network.type {network_cfg.type}: {bundle.family.label} LoRA files store {fused!r} "
                          "as one layer with other modules (q/k/v), exact for LoRA/LoCon only; use lora or locon")
    if kind != "lora" and any(s.part for s in layout.values()):
        raise ConfigError(f"network.type {network_cfg.type}: the text encoder's nn.MultiheadAttention (open_clip) "
                          "takes LoRA/LoCon only; set network.train_text_encoder to false or use lora")
    if (network_cfg.rank_dropout or network_cfg.module_dropout) and any(s.part for s in layout.values()):
        raise ConfigError("network.rank_dropout / module_dropout: the text encoder's nn.MultiheadAttention "
                          "(open_clip) trains without them; set them to 0 or network.train_text_encoder to false")
    states: dict[str, _RootState] = {}
    try:
        for root in dict.fromkeys(s.root for s in layout.values()):
            entries: dict[str, list[str]] = {}
            for s in layout.values():
                if s.root == root:
                    entries.setdefault(s.path, []).append(s.part)
            states[root] = _inject_root(
                all_roots[root][0], [(p, tuple(parts)) for p, parts in entries.items()],
                {(p, q): r for (rt, p, q), r in ranks.items() if rt == root},
                {(p, q): a for (rt, p, q), a in alphas.items() if rt == root},
                (network_cfg.dropout, network_cfg.rank_dropout, network_cfg.module_dropout), root in trained,
                kind, lokr)
    except Exception:
        LoraNetwork(bundle.arch, {}, states).remove()
        raise
    net = LoraNetwork(bundle.arch, layout, states, kind, lokr)
    weights = blocks.network_weights(bundle.arch, network_cfg) if per_block is not None else None
    if weights is not None:
        net.lr_weights = {k: weights[b] for k, s in layout.items()
                          if s.root == "unet" and (b := blocks.block_index(bundle.arch, k)) is not None}
    if init_tensors is not None:
        net.load_kohya(init_tensors)
    return net


def inject_file(bundle: ModelBundle, path: str) -> LoraNetwork:
    """The network of a LoRA file on ``bundle`` to render with: its modules, kind, ranks, alphas
    and weights, nothing trainable. ``remove()`` takes it off again."""
    from lora_trainer.lora.files import read_lora_file

    tensors, _ = read_lora_file(path)
    kinds = {m.kind for m in kohya_tensors.read_modules(_file_side(bundle.arch, tensors, to_file=False)).values()}
    kind = next(iter(kinds)) if len(kinds) == 1 else "lora"  # mixed kinds: inject_lora names the file
    return inject_lora(bundle, NetworkConfig(type=kind, init_from=path, train_unet=False,  # type: ignore[arg-type]
                                             train_text_encoder=False))
