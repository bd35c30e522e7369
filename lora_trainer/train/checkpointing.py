"""Gradient checkpointing of a denoiser's blocks, all of them or a share.

Every denoiser we train is a chain of the same few kinds of block: residual blocks and
transformer blocks in a UNet (diffusers' ``ResnetBlock2D`` and ``BasicTransformerBlock``, the
LDM code's ``ResBlock``, ``BasicTransformerBlock`` and ``AttentionBlock`` in A1111 and both
Forges), the double- and single-stream blocks of FLUX.1 and the joint blocks of SD3.5. Those are
the units diffusers' own checkpointing and A1111's recompute, so one switch serves every host: each
chosen unit's forward runs under ``torch.utils.checkpoint`` (non-reentrant, so LoRA weights inside
a unit whose inputs need no gradient still get theirs, and keyword arguments pass through).

A *share* below 1 checkpoints only part of the units: the activations of the others are kept as
without checkpointing. Each unit checkpointed saves its activations and costs its forward once
more, so a run that nearly fits without checkpointing recomputes only what it must
(``train.checkpointing_share``; the auto preset picks the smallest share that fits). Which units:
:func:`chosen`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lora_trainer.train import forwards

UNIT_CLASSES = frozenset({
    "ResnetBlock2D", "ResBlock", "BasicTransformerBlock", "AttentionBlock",  # UNets: diffusers, LDM
    "FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock",  # FLUX.1, SD3.5
})

_RESIDUAL = frozenset({"ResnetBlock2D", "ResBlock"})

# The shares the auto preset tries, least recomputation first.
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def units(root: nn.Module) -> list[nn.Module]:
    """The checkpointable blocks of ``root``, each kind in the order the forward pass runs them
    (module order, but a diffusers UNet's mid block before its up blocks, which it registers
    first; within a block diffusers registers the attentions before the resnets, so the two kinds
    interleave otherwise than in the pass). A unit inside another unit is part of it."""
    found: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for _, child in sorted(module.named_children(), key=lambda nc: nc[0] == "up_blocks"):
            if type(child).__name__ in UNIT_CLASSES:
                found.append(child)
            else:
                walk(child)

    walk(root)
    return found


def chosen(all_units: list[nn.Module], share: float) -> list[nn.Module]:
    """The units a share checkpoints: ``round(share × n)`` of them, transformer blocks first, then
    residual blocks, each kind spread evenly along the forward pass (the i-th of k at position
    ⌊(i + ½)·n/k⌋ of its kind), so every resolution level takes its part. Transformer blocks
    first because they keep the most for the backward pass per FLOP recomputed: on SD1.5 at 512²
    (bf16, kohya's targets) checkpointing half the units this way takes a step from 1.28 to 0.57
    GiB for 0.41 of a forward pass recomputed, spread over both kinds to 0.79 GiB for 0.46
    (docs/PERFORMANCE.md)."""
    n = len(all_units)
    k = max(0, min(n, round(share * n)))
    residual = [u for u in all_units if type(u).__name__ in _RESIDUAL]
    transformer = [u for u in all_units if type(u).__name__ not in _RESIDUAL]
    picked: list[nn.Module] = []
    for kind in (transformer, residual):
        take = min(k - len(picked), len(kind))
        picked += [kind[int((i + 0.5) * len(kind) / take)] for i in range(take)]
    return picked


def _checkpointed(inner: Callable[..., Any], run: Callable[..., Any]) -> Callable[..., Any]:
    """A forward that runs ``inner`` (a unit class's own forward, a plain function: torch.compile
    traces it as one graph with the rest, where ``type(self).forward`` at call time would break
    the graph at every unit) under ``run`` while gradients are on."""

    def checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(self, *args, **kwargs)
        return run(inner, self, *args, **kwargs)

    return checkpointed_forward


def checkpoint(root: nn.Module, share: float = 1.0, run: Callable[..., Any] | None = None) -> Callable[[], None]:
    """Checkpoint ``share`` of ``root``'s units (:func:`chosen`); returns the undo. Without
    gradients (samples, a WebUI's generation) a unit runs as it always does. ``run``: how a unit's
    forward is checkpointed (default: torch's non-reentrant checkpoint; the memory estimate passes
    its own for the meta device)."""
    from torch.utils.checkpoint import checkpoint as torch_checkpoint

    run = run or functools.partial(torch_checkpoint, use_reentrant=False)
    picked = chosen(units(root), share)
    undos = [forwards.install([u for u in picked if type(u) is cls], _checkpointed(cls.forward, run))
             for cls in dict.fromkeys(type(u) for u in picked)]

    def undo() -> None:
        for one in undos:
            one()

    return undo


def count(root: nn.Module) -> int:
    """How many of ``root``'s units run checkpointed now."""
    return sum(getattr(getattr(vars(u).get("forward"), "__func__", None), "__name__", "") == "checkpointed_forward"
               for u in units(root))


def outside_checkpointed(root: nn.Module, share: float, layers: list[nn.Module]) -> list[nn.Module]:
    """The ``layers`` of ``root`` that are not inside a unit the share checkpoints."""
    inside = {id(m) for u in chosen(units(root), share) for m in u.modules()}
    return [m for m in layers if id(m) not in inside]


def describe(share: float) -> str:
    """"off", "on" (every block) or "50 % of blocks": a share as the benchmarks print it."""
    return "off" if not share else "on" if share >= 1 else f"{share:.0%} of blocks".replace("%", " %")
