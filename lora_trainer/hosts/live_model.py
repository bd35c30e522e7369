"""Training a host's live model in place, and leaving it exactly as it was.

A WebUI host lends the trainer the model it generates with; no second copy of the weights is
made. These helpers record what training may change (requires_grad flags, devices, dtypes,
train/eval modes), freeze the weights, fingerprint them cheaply on their own device, and put
everything back afterwards. They know torch and peft, never a WebUI, so both the A1111 and the
Forge host use them and the tests run them without one.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class _TensorPlace:
    module: nn.Module
    name: str
    is_param: bool
    device: torch.device
    dtype: torch.dtype
    requires_grad: bool


@dataclass
class ModelSnapshot:
    """Placement and flags of every parameter and buffer under some root modules."""

    places: list[_TensorPlace] = field(default_factory=list)
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list)

    @classmethod
    def capture(cls, roots: list[nn.Module]) -> ModelSnapshot:
        snap = cls()
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                snap.modes.append((module, module.training))
                for name, p in module._parameters.items():
                    if p is not None:
                        snap.places.append(_TensorPlace(module, name, True, p.device, p.dtype, p.requires_grad))
                for name, b in module._buffers.items():
                    if b is not None:
                        snap.places.append(_TensorPlace(module, name, False, b.device, b.dtype, False))
        return snap

    def restore(self) -> int:
        """Put devices, dtypes, requires_grad and train/eval modes back; returns tensors moved."""
        moved = 0
        for pl in self.places:
            store = pl.module._parameters if pl.is_param else pl.module._buffers
            t = store.get(pl.name)
            if t is None:
                continue
            if t.device != pl.device or t.dtype != pl.dtype:
                moved += 1
                with torch.no_grad():
                    if pl.is_param:
                        # Keep the Parameter object: the WebUI (and its Lora backups) refer to it.
                        t.data = t.data.to(pl.device, pl.dtype)
                    else:
                        store[pl.name] = t.to(pl.device, pl.dtype)
            if pl.is_param and t.requires_grad != pl.requires_grad:
                t.requires_grad_(pl.requires_grad)
            if pl.is_param and t.grad is not None:
                t.grad = None
        for module, training in self.modes:
            if module.training != training:
                module.train(training)
        return moved


def freeze(roots: list[nn.Module]) -> None:
    """Base weights never learn (A1111 leaves them with requires_grad=True)."""
    for root in roots:
        root.requires_grad_(False)


def fingerprint(roots: dict[str, nn.Module]) -> dict[str, tuple[float, float]]:
    """Cheap per-tensor checksums computed where the tensors are (no copy to the CPU).

    Two float64 sums (plain and position-weighted) catch any real change of a weight; the
    tests prove exact equality with :func:`state_hash` on top.
    """
    out: dict[str, tuple[float, float]] = {}
    with torch.no_grad():
        for root_name, root in roots.items():
            for name, t in root.state_dict(keep_vars=True).items():
                if not torch.is_tensor(t) or t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
                    continue
                flat = t.detach().reshape(-1).double()
                w = torch.linspace(1.0, 2.0, flat.numel(), device=flat.device, dtype=torch.float64)
                out[f"{root_name}.{name}"] = (float(flat.sum()), float((flat * w).sum()))
    return out


def changed_tensors(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> list[str]:
    names = sorted(set(before) | set(after))
    return [n for n in names if before.get(n) != after.get(n)]


def state_hash(module: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes (exact; copies to CPU)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def strip_peft_layers(root: nn.Module) -> int:
    """Replace any peft LoRA wrapper left under ``root`` by its base layer; returns how many.

    The trainer removes its layers itself; this is the safety net for a run that died before
    it could, so the WebUI never generates through a leftover adapter.
    """
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft missing: nothing can have been injected
        return 0
    from lora_trainer.lora.mha import LoraMultiheadAttention

    def base_of(module: nn.Module) -> nn.Module | None:
        if isinstance(module, BaseTunerLayer):
            return module.get_base_layer()
        if isinstance(module, LoraMultiheadAttention):
            return module.base
        return None

    found = [name for name, module in root.named_modules() if name and base_of(module) is not None]
    # Deepest first, so a parent's replacement never hides a child's path.
    count = 0
    for name in sorted(found, key=lambda n: n.count("."), reverse=True):
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        base = base_of(getattr(parent, child))
        if base is not None:
            setattr(parent, child, base)
            count += 1
    if count:
        log.warning("removed %d LoRA layers left in the live model by an interrupted run", count)
    return count


def make_autograd_safe(root: nn.Module) -> int:
    """Replace parameters and buffers created under ``torch.inference_mode`` by normal tensors
    with the same values, device and dtype; returns how many. Forge Neo loads checkpoints in
    inference mode, and autograd cannot save such a tensor (a frozen Linear's backward needs its
    weight). One tensor is copied at a time, so the peak is one tensor, not a second model."""
    count = 0
    with torch.no_grad():
        for module in root.modules():
            for store in (module._parameters, module._buffers):
                for name, t in list(store.items()):
                    if t is None or not t.is_inference():
                        continue
                    plain = t.clone()
                    store[name] = nn.Parameter(plain, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else plain
                    count += 1
    return count
