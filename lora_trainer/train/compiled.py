"""``train.compile``: torch.compile of the denoiser for one run, undone at its end.

Shapes are static per batch shape (``dynamic=False``): buckets give a few fixed sizes, each
compiles once on its first step, and static shapes are what CUDA graphs
(``train.compile_mode: reduce-overhead``) need and what gives inductor its best kernels. Dynamo
recompiles a function for each new shape up to its ``recompile_limit`` (8 by default) and then runs
it eagerly without telling anyone, so the limit is raised for the run and set back afterwards. The
graphs of earlier runs in the same process (a WebUI trains many times) stay cached and count
toward that limit too: a later run with the same settings reuses them and compiles nothing, one
with another rank adds its own, so the limit covers every shape this process's runs compiled.
Under CUDA graphs the run ends with ``torch.compiler.reset()``: their private memory pool would
otherwise keep GPU memory from the host after training. Sample images run the model uncompiled
(no extra compiles for a no-grad, eval-mode pass at another batch size).

Only the denoiser is compiled. A trained text encoder runs once per step on 77 tokens, a small
part of the step, and would cost its own compile time for every run.

With peft's LoRA layers and our gradient checkpointing (train/checkpointing.py, all or a share of
the blocks) the UNet traces as one graph with no graph break (``torch._dynamo.explain`` on the
tiny SD1 UNet, torch 2.14, peft 0.21).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import ConfigError

# What torch.compile is given as its backend. Tests set "aot_eager" (or a callable around it):
# dynamo's tracing and AOT autograd's forward/backward graphs run without inductor's build.
BACKEND: Any = "inductor"

# Inductor's modes that record CUDA graphs (on CUDA devices only).
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Recompiles the run allows beyond one per batch shape (the guards of a first call, a dtype change).
_SPARE_COMPILES = 4
# Batch shapes compiled by this process's runs since the last reset: their graphs stay cached.
_compiled_shapes = [0]


def batch_shapes(plan: Iterable[list[Any]]) -> set[tuple[int, tuple[int, int]]]:
    """(batch size, bucket) of every batch of an epoch plan: the shapes the model will see (each
    epoch has the same ones; a bucket's last batch may be smaller)."""
    return {(len(batch), batch[0].bucket) for batch in plan if batch}


def reset() -> None:
    """Drop every compiled graph of this process (``torch.compiler.reset``)."""
    torch.compiler.reset()
    _compiled_shapes[0] = 0


def check_compile(device_type: str) -> None:
    """One line before anything loads when this torch cannot compile for ``device_type``."""
    if not hasattr(nn.Module, "compile"):
        raise ConfigError(f"train.compile needs torch 2.2 or newer (this is {torch.__version__}); "
                          "set train.compile to false")
    if BACKEND != "inductor":
        return
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile: torch.compile on CUDA needs Triton, which is not installed "
                              "(pip install triton; on Windows triton-windows), or set train.compile to false")
    # Triton builds its launchers with a C compiler, inductor's CPU kernels with a C++ one (MSVC on
    # Windows, found by torch itself).
    variable, names = ("CC", ("gcc", "clang", "cc")) if device_type == "cuda" else ("CXX", ("g++", "clang++", "c++"))
    if os.name != "nt" and not os.environ.get(variable) and not any(shutil.which(n) for n in names):
        raise ConfigError(f"train.compile: torch.compile on {device_type} builds its kernels with a "
                          f"{'C' if variable == 'CC' else 'C++'} compiler and none was found ({', '.join(names)}, "
                          f"or ${variable}); install one or set train.compile to false")


def _limit_name() -> str:
    config = torch._dynamo.config
    return "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # before torch 2.6


def _limit_names() -> tuple[str, str]:
    """Dynamo's limits per function and for all functions together."""
    config = torch._dynamo.config
    total = "accumulated_recompile_limit" if hasattr(config, "accumulated_recompile_limit") else \
        "accumulated_cache_size_limit"
    return _limit_name(), total


class CompiledDenoiser:
    """torch.compile on ``module`` (``nn.Module.compile``: the module object stays the same and
    the host's references to it keep working) until :meth:`undo`."""

    def __init__(self, module: nn.Module, mode: str, shapes: int, device_type: str) -> None:
        self.module, self.mode, self.shapes = module, mode, shapes
        self.cudagraphs = device_type == "cuda" and mode in CUDAGRAPH_MODES

    def start(self) -> Callable[[], None]:
        """Compile (lazily: the first call of each shape compiles) and return the undo."""
        config = torch._dynamo.config
        before = {name: getattr(config, name) for name in _limit_names()}
        _compiled_shapes[0] += self.shapes
        for name, value in before.items():
            setattr(config, name, max(value, _compiled_shapes[0] + _SPARE_COMPILES))
        kwargs: dict[str, Any] = {"backend": BACKEND, "dynamic": False}
        if BACKEND == "inductor":
            kwargs["mode"] = self.mode
        self.module.compile(**kwargs)
        compiled = self.module._compiled_call_impl

        def undo() -> None:
            if self.module._compiled_call_impl is compiled:
                self.module._compiled_call_impl = None
            for name, value in before.items():
                setattr(config, name, value)
            if self.cudagraphs:
                reset()

        return undo

    def step_begin(self) -> None:
        """Before each forward pass: a new CUDA-graph iteration (the last one's outputs are dead)."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The module runs uncompiled inside (sample images)."""
        compiled, self.module._compiled_call_impl = self.module._compiled_call_impl, None
        try:
            yield
        finally:
            self.module._compiled_call_impl = compiled

    def status(self) -> str:
        sizes = f"{self.shapes} batch shape{'s' if self.shapes != 1 else ''}"
        return (f"torch.compile ({self.mode}) of the denoiser: the first step of each new size compiles "
                f"({sizes} in this dataset; minutes each with inductor), the steps after it run compiled")
