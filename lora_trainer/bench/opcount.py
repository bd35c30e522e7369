"""Counting what a step dispatches: aten ops, those that compute (a kernel launch each on a GPU),
dtype casts, memory-format conversions and device copies (``bench --profile`` and the memory
estimate's traced step use it)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = ("_to_copy", "copy_", "clone")


def _layout(t: torch.Tensor) -> str:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous" if t.is_contiguous() else "strided"


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, backward and optimizer alike):
    all of them, those that compute (views excluded), and among the copies the dtype casts,
    the memory-format conversions and the device transfers."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.computing = 0
        self.casts = 0
        self.format_conversions = 0
        self.device_copies = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.__name__.split(".")[0]
        self.ops[name] += 1
        if not func.is_view:
            self.computing += 1
        if name in _COPIES:
            self._classify(name, args, kwargs, out)
        return out

    def _classify(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        if name == "copy_":
            dst, src = args[0], args[1]
        else:
            src, dst = args[0], out
        if not (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)):
            return
        self.casts += src.dtype != dst.dtype
        self.device_copies += src.device != dst.device
        self.format_conversions += src.dim() == 4 and _layout(src) != _layout(dst)
