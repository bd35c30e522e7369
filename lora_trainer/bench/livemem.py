"""Peak live memory of code run on PyTorch's ``meta`` device, as an allocator that frees a
tensor's memory the moment its last reference goes (what the CUDA caching allocator's
``max_memory_allocated`` and a CPU's ``malloc`` with large blocks both report).

Hand-rolled because PyTorch's own tracker (``torch.distributed._tools.mem_tracker``) is private,
needs a recent torch and counts per module; the WebUIs ship torch 2.1. Every tensor an aten op
creates (forward, backward, optimizer) is counted from the op that made it until its storage is
freed; tensors that existed before (parameters, the inputs) are not counted.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_CONVOLUTIONS = ("convolution", "convolution_backward")


def _storages_have_identity() -> bool:
    """Whether a storage's Python object lives as long as the storage (torch >= 2.1): then a weak
    reference to it says exactly when the memory is freed."""
    t = torch.empty(4, device="meta")
    ref = weakref.ref(t.untyped_storage())
    return ref() is not None


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages created while active, alive until freed; ``peak`` is the
    most alive at once (an op's inputs and outputs are alive together while it runs)."""

    def __init__(self, conv_workspace: float = 0.0) -> None:
        super().__init__()
        # cuDNN convolutions take a workspace from the same allocator while they run: allowed
        # for as ``conv_workspace`` times the largest of the op's tensors.
        self.conv_workspace = conv_workspace
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[Any, int]] = {}  # storage key -> (weak reference, bytes)
        self._weak = _storages_have_identity()
        self._upper = 0  # current, plus frees not yet seen (sweep mode only)

    def reset_peak(self) -> None:
        self._sweep()
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results share an input's storage: nothing new (a parameter's view
        # is not an allocation).
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        given = {t.untyped_storage()._cdata for t in inputs}
        for t in outputs:
            if t.untyped_storage()._cdata not in given:
                self._add(t.untyped_storage())
        extra = 0
        if self.conv_workspace and func.__name__.split(".")[0] in _CONVOLUTIONS:
            extra = int(self.conv_workspace * max(t.numel() * t.element_size() for t in inputs + outputs))
        if self._weak:
            self.peak = max(self.peak, self.current + extra)
        elif self._upper + extra > self.peak:
            self._sweep()
            self.peak = max(self.peak, self.current + extra)
        return out

    def _add(self, storage: Any) -> None:
        key = storage._cdata
        held = self._live.get(key)
        if held is not None and not self._expired(held[0]):
            return
        size = storage.nbytes()
        if self._weak:
            ref = weakref.ref(storage, lambda _r, key=key: self._free(key))
        else:
            from torch.multiprocessing.reductions import StorageWeakRef

            ref = StorageWeakRef(storage)
        self._live[key] = (ref, size)
        self.current += size
        self._upper += size

    def _free(self, key: int) -> None:
        held = self._live.pop(key, None)
        if held is not None:
            self.current -= held[1]

    def _expired(self, ref: Any) -> bool:
        return ref() is None if self._weak else ref.expired()

    def _sweep(self) -> None:
        if not self._weak:
            for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
                self._free(key)
        self._upper = self.current
