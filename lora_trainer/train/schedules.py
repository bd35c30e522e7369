"""Learning-rate schedules as one pure function, plus a LambdaLR wrapper for the optimizer.

diffusers' ``get_scheduler`` has the same shapes, but a pure ``lr_at(step)`` is what the UI
preview, the tests and the checkpoint logic need; LambdaLR then only multiplies by it.
"""

from __future__ import annotations

import math

import torch

KINDS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


def lr_at(step: int, base_lr: float, total_steps: int, warmup: int = 0, kind: str = "constant",
          num_cycles: int = 1, power: float = 1.0) -> float:
    """Learning rate used for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup over the first ``warmup`` steps (``base_lr * (step + 1) / (warmup + 1)``, so
    no step is wasted at lr 0), then: constant; linear decay to 0; cosine decay to 0; cosine decay restarting
    ``num_cycles`` times (hard restarts); or polynomial decay to 0, ``(1 - progress) ** power``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown lr schedule {kind!r}; expected one of {', '.join(KINDS)}")
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / (warmup + 1)
    if kind == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
    if kind == "linear":
        return base_lr * (1.0 - progress)
    if kind == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "polynomial":
        return base_lr * (1.0 - progress) ** power
    # cosine_with_restarts
    if progress >= 1.0:
        return 0.0
    cycle_progress = (progress * num_cycles) % 1.0
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * cycle_progress))


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: int, kind: str,
                   num_cycles: int = 1, power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor is ``lr_at(step, 1.0, ...)``: each param group keeps its own base lr."""

    def factor(step: int) -> float:
        return lr_at(step, 1.0, total_steps, warmup, kind, num_cycles, power)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
