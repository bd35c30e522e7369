"""Callbacks out, commands in: how a UI or the CLI follows and steers a training run.

The trainer runs in a worker thread. It emits :class:`TrainEvent` objects to callbacks (which
must never raise into the loop: errors there are logged and ignored) and checks
:class:`Commands` flags once per step. :class:`RunState` keeps a snapshot a UI can poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_trainer.errors import report_failure

log = logging.getLogger(__name__)

EventKind = Literal["status", "step", "sample", "checkpoint", "done", "stopped", "error"]


@dataclass
class TrainEvent:
    kind: EventKind
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    it_per_s: float | None = None
    eta_s: float | None = None
    message: str = ""
    image: Any = None  # PIL.Image for "sample"
    path: str | None = None  # file written, for "checkpoint"/"done"/"sample"
    time: float = field(default_factory=time.time)


Callback = Callable[[TrainEvent], None]


def emit(callbacks: list[Callback], event: TrainEvent) -> None:
    """Send ``event`` to every callback; a failing callback is logged, never raised."""
    for cb in callbacks:
        try:
            cb(event)
        except Exception:  # noqa: BLE001 - a UI bug must not kill a training run
            log.exception("training callback %r failed on %s event", cb, event.kind)


class Commands:
    """Thread-safe flags a UI sets and the loop reads once per step."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._save = threading.Event()
        self._sample = threading.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def request_save(self) -> None:
        self._save.set()

    def request_sample(self) -> None:
        self._sample.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    def take_save(self) -> bool:
        """True once per request."""
        if self._save.is_set():
            self._save.clear()
            return True
        return False

    def take_sample(self) -> bool:
        if self._sample.is_set():
            self._sample.clear()
            return True
        return False


@dataclass
class RunState:
    """What a UI shows; updated from events by :meth:`update`, read with :meth:`snapshot`."""

    status: str = "idle"  # idle | running | done | stopped | error
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    it_per_s: float | None = None
    eta_s: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    lrs: list[tuple[int, float]] = field(default_factory=list)
    samples: list[tuple[int, Any]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    output_path: str | None = None
    error: str | None = None
    checkpoints: int = 0  # checkpoints saved so far (each may add a step LoRA to the LoRA folder)
    phase: str | None = None  # the first line of the latest status message (what happens before step 1)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def update(self, ev: TrainEvent) -> None:
        with self._lock:
            if ev.kind == "step":
                self.status = "running"
                self.step, self.total_steps, self.epoch = ev.step, ev.total_steps, ev.epoch
                self.it_per_s, self.eta_s = ev.it_per_s, ev.eta_s
                if ev.loss is not None:
                    self.losses.append((ev.step, ev.loss))
                if ev.lr is not None:
                    self.lrs.append((ev.step, ev.lr))
            elif ev.kind == "sample" and ev.image is not None:
                self.samples.append((ev.step, ev.image))
            elif ev.kind == "checkpoint":
                self.checkpoints += 1
            elif ev.kind in ("done", "stopped"):
                self.status = ev.kind
                self.output_path = ev.path or self.output_path
            elif ev.kind == "error":
                self.status = "error"
                self.error = ev.message
            elif ev.kind == "status":
                self.status = "running" if self.status == "idle" else self.status
                self.phase = ev.message.strip().split("\n", 1)[0] or self.phase
            if ev.message:
                self.log.append(ev.message)
                del self.log[:-500]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": self.status, "step": self.step, "total_steps": self.total_steps,
                "epoch": self.epoch, "it_per_s": self.it_per_s, "eta_s": self.eta_s,
                "losses": list(self.losses), "lrs": list(self.lrs),
                "samples": list(self.samples), "log": list(self.log),
                "output_path": self.output_path, "error": self.error, "checkpoints": self.checkpoints,
                "phase": self.phase,
            }


class WorkerRun:
    """What a UI needs of any training run: commands in, a state snapshot out, and ``start()`` to
    run it in a worker thread (the result or the error lands in ``.result`` / ``.error``).
    Subclasses implement ``run()``."""

    thread_name = "lora-trainer"
    job_label = "LoRA training"  # names the run in the log when it fails

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks: list[Callback] = list(callbacks or [])
        self.commands = Commands()
        self.state = RunState()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        self.commands.request_stop()

    def save_now(self) -> None:
        self.commands.request_save()

    def sample_now(self) -> None:
        self.commands.request_sample()

    def start(self) -> threading.Thread:
        def work() -> None:
            try:
                self.run()
            except BaseException as e:  # noqa: BLE001 - reported through events and .error
                self.error = e
                report_failure(log, self.job_label, e)

        thread = threading.Thread(target=work, name=self.thread_name, daemon=True)
        thread.start()
        return thread
