"""A forward of ours on individual modules (an instance attribute over the class's), taken off
again exactly: the lean LoRA forward (train/lora_forward.py) and the recasting one
(train/recast.py) share this."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn


def runs(module: nn.Module, fn: Callable[..., Any]) -> bool:
    """Whether ``module``'s own forward is ``fn`` now."""
    own = vars(module).get("forward")
    return isinstance(own, types.MethodType) and own.__func__ is fn


def install(layers: Iterable[nn.Module], fn: Callable[..., Any]) -> Callable[[], None]:
    """Make ``fn`` the forward of each layer that has no forward of its own yet; returns the
    callable that takes it off again."""
    changed = [m for m in layers if "forward" not in vars(m)]
    for m in changed:
        m.forward = types.MethodType(fn, m)

    def undo() -> None:
        for m in changed:
            if runs(m, fn):
                del m.forward

    return undo


def count(model: nn.Module, fn: Callable[..., Any]) -> int:
    """How many modules of ``model`` run ``fn`` as their forward now."""
    return sum(runs(m, fn) for m in model.modules())
