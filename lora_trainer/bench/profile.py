"""``bench --profile``: where a training step's time goes, counted per step.

A GPU step that is launch-bound spends its time dispatching small kernels, casting dtypes and
converting memory formats, not computing. Those counts do not need a GPU: every aten op that
computes (views excluded) is a kernel launch on a GPU, so counting the ops dispatched per step
on the CPU shows what a change saves there. Two passes over the same steps of each loop (ours
and the reference loop): one under :class:`OpCounter` (exact counts: ops, dtype casts,
memory-format conversions, device copies), one under ``torch.profiler`` (the top ops by time,
and on CUDA the kernels really launched).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lora_trainer.bench.opcount import OpCounter


@dataclass
class LoopProfile:
    loop: str  # "ours" or "reference"
    steps: int
    ops_per_step: float
    computing_ops_per_step: float  # views excluded: the CPU proxy of kernel launches
    casts_per_step: float
    format_conversions_per_step: float
    device_copies_per_step: float
    top_ops: list[tuple[str, float]] = field(default_factory=list)  # (op, count per step)
    top_time: list[tuple[str, float]] = field(default_factory=list)  # (op, self ms per step)
    kernels_per_step: float | None = None  # CUDA only: kernels the profiler saw launched

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def counts_of(counter: OpCounter, steps: int, loop: str) -> LoopProfile:
    per = max(1, steps)
    top = [(n, c / per) for n, c in counter.ops.most_common(12)]
    return LoopProfile(loop, steps, sum(counter.ops.values()) / per, counter.computing / per, counter.casts / per,
                       counter.format_conversions / per, counter.device_copies / per, top)


def add_timing(profile: LoopProfile, prof: Any, steps: int, device: torch.device) -> None:
    """The top ops by self time (ms per step) and, on CUDA, the kernels launched per step."""
    per = max(1, steps)
    averages = prof.key_averages()
    rows = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    profile.top_time = [(e.key, e.self_cpu_time_total / 1000 / per) for e in rows]
    if device.type == "cuda":
        kernels = sum(e.count for e in averages if "LaunchKernel" in e.key or "cuLaunch" in e.key)
        profile.kernels_per_step = kernels / per


class StepWindow:
    """Enters a context at the step event ``start`` and leaves it at the first step event at or
    after ``start + steps``: counts the steps in between (the trainer reports every step on a
    CPU, every few on a GPU)."""

    def __init__(self, make: Any, start: int, steps: int) -> None:
        self.make, self.start, self.steps = make, start, steps
        self.cm: Any = None
        self.value: Any = None
        self.first = self.last = None

    def on_event(self, ev: Any) -> None:
        if ev.kind != "step":
            return
        if self.cm is None and self.first is None and ev.step >= self.start:
            self.first = ev.step
            self.cm = self.make()
            self.value = self.cm.__enter__()
        elif self.cm is not None and ev.step >= self.first + self.steps:
            self.last = ev.step
            self.cm.__exit__(None, None, None)
            self.cm = None

    def close(self) -> None:
        if self.cm is not None:
            self.cm.__exit__(None, None, None)
            self.cm = None

    @property
    def counted(self) -> int:
        return (self.last or 0) - (self.first or 0)


def torch_profiler(device: torch.device) -> Any:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return profile(activities=activities)


def format_profiles(rows: list[LoopProfile]) -> str:
    lines = [f"{'loop':<10} {'steps':>5} {'aten ops':>9} {'computing':>10} {'casts':>7} {'format':>7} "
             f"{'device':>7} {'kernels':>8}   (per step; computing = views excluded, the CPU proxy of launches)"]
    for r in rows:
        kernels = f"{r.kernels_per_step:8.0f}" if r.kernels_per_step is not None else f"{'n/a':>8}"
        lines.append(f"{r.loop:<10} {r.steps:>5} {r.ops_per_step:9.0f} {r.computing_ops_per_step:10.0f} "
                     f"{r.casts_per_step:7.0f} {r.format_conversions_per_step:7.0f} {r.device_copies_per_step:7.0f} "
                     f"{kernels}")
    for r in rows:
        lines.append(f"top ops of {r.loop} (count per step): "
                     + ", ".join(f"{n} {c:.0f}" for n, c in r.top_ops[:8]))
        if r.top_time:
            lines.append(f"top ops of {r.loop} (self ms per step): "
                         + ", ".join(f"{n} {t:.2f}" for n, t in r.top_time[:8]))
    return "\n".join(lines)


def _cadence(device: torch.device, n: int) -> int:
    """``n`` rounded up to the trainer's step-event cadence (every step on a CPU, every 10 on a GPU)."""
    every = 1 if device.type == "cpu" else 10
    return -(-max(1, n) // every) * every


def profile_bench(spec: Any) -> list[LoopProfile]:
    """Counts and timings per step of our loop and (``spec.reference``) the reference loop:
    ``spec.warmup`` steps, then ``spec.steps`` steps counted, then as many profiled."""
    import tempfile
    from dataclasses import replace
    from pathlib import Path

    from lora_trainer.bench.runner import resolve_device, time_our_loop, time_reference

    device = resolve_device(spec.device)
    start, steps = _cadence(device, spec.warmup), _cadence(device, spec.steps)
    counter, prof = OpCounter(), torch_profiler(device)
    windows = [StepWindow(lambda: counter, start, steps), StepWindow(lambda: prof, start + steps, steps)]
    run = replace(spec, warmup=start, steps=2 * steps)
    try:
        with tempfile.TemporaryDirectory(prefix="lora_trainer_profile_") as tmp:
            time_our_loop(run, device, Path(tmp), listeners=[w.on_event for w in windows])
    finally:
        for w in windows:
            w.close()
    ours = counts_of(counter, windows[0].counted, "ours")
    add_timing(ours, prof, windows[1].counted, device)
    rows = [ours]
    if spec.reference:
        counter, prof = OpCounter(), torch_profiler(device)
        time_reference(replace(spec, steps=steps), device, windows=[lambda: counter, lambda: prof])
        ref = counts_of(counter, steps, "reference")
        add_timing(ref, prof, steps, device)
        rows.append(ref)
    return rows
