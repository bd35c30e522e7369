"""Put LoRA layers into a ModelBundle (peft), read them out as kohya tensors, take them out again.

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
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lora_trainer.config import NetworkConfig
from lora_trainer.errors import ConfigError, HostError, LoraFormatError
from lora_trainer.lora import kohya
from lora_trainer.lora.kohya import LoraWeights, Slot
from lora_trainer.lora.mha import LoraMultiheadAttention
from lora_trainer.lora.targets import _is_adaptable, find_targets
from lora_trainer.models.bundle import ModelBundle

ADAPTER = "default"


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
    """The LoRA layers of one bundle, addressed by kohya key."""

    def __init__(self, arch: str, layout: dict[str, Slot], roots: dict[str, _RootState]) -> None:
        self.arch = arch
        self.layout = layout
        self._roots = roots
        self._multiplier = 1.0
        self._removed = False

    # --- access ---------------------------------------------------------------------------
    def _module(self, slot: Slot) -> nn.Module:
        return self._roots[slot.root].module.get_submodule(slot.path)

    def _params(self, key: str) -> tuple[nn.Parameter, nn.Parameter]:
        slot = self.layout[key]
        m = self._module(slot)
        if isinstance(m, LoraMultiheadAttention):
            return m.lora_down[slot.part].weight, m.lora_up[slot.part].weight
        return m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight

    def alpha(self, key: str) -> float:
        slot = self.layout[key]
        m = self._module(slot)
        return float(m.alphas[slot.part] if isinstance(m, LoraMultiheadAttention) else m.lora_alpha[ADAPTER])

    def _set_alpha(self, key: str, alpha: float) -> None:
        slot = self.layout[key]
        m = self._module(slot)
        if isinstance(m, LoraMultiheadAttention):
            m.alphas[slot.part] = alpha
        else:
            m.lora_alpha[ADAPTER] = alpha
            m.set_scale(ADAPTER, self._multiplier)

    @property
    def network_dim(self) -> int:
        """The most common rank (what ss_network_dim reports; from the file with init_from)."""
        return Counter(self._params(k)[0].shape[0] for k in self.layout).most_common(1)[0][0]

    @property
    def network_alpha(self) -> float:
        """The most common alpha (ss_network_alpha)."""
        return Counter(self.alpha(k) for k in self.layout).most_common(1)[0][0]

    def parameters(self, root: str | None = None) -> list[nn.Parameter]:
        """LoRA parameters (fp32) of the trainable roots, or of ``root`` only."""
        out: list[nn.Parameter] = []
        for key, slot in self.layout.items():
            if (root is None and self._roots[slot.root].trainable) or slot.root == root:
                out.extend(self._params(key))
        return out

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = []
        unet = self.parameters("unet") if self._roots.get("unet", None) and self._roots["unet"].trainable else []
        te = [p for r, s in self._roots.items() if r != "unet" and s.trainable for p in self.parameters(r)]
        if unet:
            groups.append({"params": unet, "lr": unet_lr, "name": "unet"})
        if te:
            groups.append({"params": te, "lr": te_lr, "name": "text_encoder"})
        return groups

    # --- kohya ----------------------------------------------------------------------------
    def weights(self) -> dict[str, LoraWeights]:
        return {k: LoraWeights(*self._params(k), alpha=self.alpha(k)) for k in self.layout}

    def to_kohya(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        return kohya.to_kohya_tensors(self.weights(), dtype)

    def load_kohya(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy file tensors into the LoRA layers; every key must match, with the same shapes."""
        incoming = kohya.from_kohya_tensors(tensors)
        unknown = [k for k in incoming if k not in self.layout]
        if unknown:
            raise LoraFormatError(f"LoRA key {unknown[0]!r} matches no LoRA module of this model "
                                  f"({len(unknown)} unmatched); is it for another architecture?")
        missing = [k for k in self.layout if k not in incoming]
        if missing:
            raise LoraFormatError(f"LoRA module {missing[0]!r} is missing from the tensors ({len(missing)} missing)")
        for key, w in incoming.items():
            down, up = self._params(key)
            for name, have, new in (("lora_down.weight", down, w.down), ("lora_up.weight", up, w.up)):
                if tuple(have.shape) != tuple(new.shape):
                    raise LoraFormatError(f"LoRA tensor {key}.{name} has shape {tuple(new.shape)}, "
                                          f"the model needs {tuple(have.shape)}")
        with torch.no_grad():
            for key, w in incoming.items():
                down, up = self._params(key)
                down.copy_(w.down)
                up.copy_(w.up)
                self._set_alpha(key, w.alpha)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 copy of every LoRA tensor (kohya keys) for training checkpoints."""
        return {k: v.clone() for k, v in self.to_kohya(torch.float32).items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.load_kohya(sd)

    # --- strength and removal -------------------------------------------------------------
    def set_scale(self, w: float) -> None:
        """Multiply every LoRA delta by ``w`` (0 turns the LoRA off, 1 is the trained strength)."""
        self._multiplier = float(w)
        for slot in self.layout.values():
            m = self._module(slot)
            if isinstance(m, LoraMultiheadAttention):
                m.multiplier = self._multiplier
            else:
                m.set_scale(ADAPTER, self._multiplier)

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
                 alphas: dict[tuple[str, str], float], cfg: NetworkConfig, trainable: bool) -> _RootState:
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
            config = LoraConfig(
                r=r0, lora_alpha=a0, lora_dropout=cfg.dropout, target_modules=plain,
                rank_pattern={_exact_pattern(p): ranks[(p, "")] for p in plain if ranks[(p, "")] != r0},
                alpha_pattern={_exact_pattern(p): alphas[(p, "")] for p in plain if alphas[(p, "")] != a0},
                init_lora_weights=True)
            inject_adapter_in_model(config, root, adapter_name=ADAPTER)
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
    # peft froze the whole root; LoRA parameters train (in fp32) only when the root is trained.
    for name, p in root.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora and trainable)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()
    return state


def inject_lora(bundle: ModelBundle, network_cfg: NetworkConfig) -> LoraNetwork:
    """Add LoRA layers to ``bundle`` in place (UNet when train_unet, each text encoder when
    train_text_encoder; with init_from, the modules and ranks/alphas of that file)."""
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
    if network_cfg.init_from:
        from lora_trainer.lora.files import read_lora_file

        init_tensors, _ = read_lora_file(network_cfg.init_from)
        incoming = kohya.from_kohya_tensors(init_tensors)
        candidates = _candidate_layout(bundle.arch, all_roots)
        unknown = [k for k in incoming if k not in candidates]
        if unknown:
            raise LoraFormatError(f"{network_cfg.init_from}: LoRA key {unknown[0]!r} matches no module of this "
                                  f"{bundle.arch} model ({len(unknown)} unmatched)")
        layout = {k: candidates[k] for k in sorted(incoming)}
        ranks = {(s.root, s.path, s.part): incoming[k].rank for k, s in layout.items()}
        alphas = {(s.root, s.path, s.part): incoming[k].alpha for k, s in layout.items()}
    else:
        use = {k: v for k, v in all_roots.items() if k in trained}
        found = find_targets(use, network_cfg.target_modules or None)
        targets = {k: (all_roots[k][1], _module_paths(all_roots[k][0], found[k])) for k in use}
        layout = kohya.build_layout(bundle.arch, targets)
        ranks = {(s.root, s.path, s.part): network_cfg.rank for s in layout.values()}
        alphas = {(s.root, s.path, s.part): float(network_cfg.alpha) for s in layout.values()}
    if not layout:
        raise ConfigError("network: no module to put a LoRA on; enable network.train_unet or "
                          "network.train_text_encoder, or check network.target_modules")
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
                {(p, q): a for (rt, p, q), a in alphas.items() if rt == root}, network_cfg, root in trained)
    except Exception:
        LoraNetwork(bundle.arch, {}, states).remove()
        raise
    net = LoraNetwork(bundle.arch, layout, states)
    if init_tensors is not None:
        net.load_kohya(init_tensors)
    return net
