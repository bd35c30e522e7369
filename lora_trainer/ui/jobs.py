"""The job registry: training runs outlive the page that started them.

A run lives in a worker thread owned by this module, not by a gradio session, so reloading the
page or closing the browser does not stop it; the tab polls :func:`current` and shows the
running (or last finished) job again. One image-training run at a time per process: the model
and the GPU are shared.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lora_trainer.errors import HostError

# A trainer as the tab needs it: ``.start() -> Thread``, ``.state.snapshot()``, ``.stop()``,
# ``.save_now()``, ``.sample_now()`` (lora_trainer.train.trainer.Trainer).
TrainerFactory = Callable[..., Any]


@dataclass
class Job:
    id: str
    config: Any
    trainer: Any
    started_at: float = field(default_factory=time.time)
    thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        snap = dict(self.trainer.state.snapshot())
        # The state says "running" from the first event; a thread that died without a final
        # event (a crash outside the loop) must not look like it is still running.
        if not self.alive and snap.get("status") in ("idle", "running"):
            snap["status"] = "error" if snap.get("error") else "finished"
        snap.update(job_id=self.id, alive=self.alive, started_at=self.started_at,
                    output_name=self.config.output.output_name)
        return snap

    def stop(self) -> None:
        self.trainer.stop()

    def save_now(self) -> None:
        self.trainer.save_now()

    def sample_now(self) -> None:
        self.trainer.sample_now()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


_LOCK = threading.Lock()
_JOBS: dict[str, Job] = {}
_COUNTER = itertools.count(1)
_MAX_KEPT = 20


def default_trainer_factory(config: Any, host: Any, callbacks: list[Any]) -> Any:
    from lora_trainer.train.preflight import preflight
    from lora_trainer.train.trainer import Trainer

    preflight(config, host)  # a bad name or folder is refused at Start, before a thread or a model
    return Trainer(config, host=host, callbacks=callbacks)


def start(config: Any, host: Any, *, callbacks: list[Any] | None = None,
          factory: TrainerFactory | None = None) -> Job:
    """Start a run in a worker thread and register it; HostError if one is still running."""
    with _LOCK:
        running = [j for j in _JOBS.values() if j.alive]
        if running:
            raise HostError(f"training run '{running[0].config.output.output_name}' is still running; "
                            "stop it (Stop button) or wait until it finishes")
        trainer = (factory or default_trainer_factory)(config, host, list(callbacks or []))
        job = Job(id=f"job{next(_COUNTER)}", config=config, trainer=trainer)
        job.thread = trainer.start()
        _JOBS[job.id] = job
        for old in list(_JOBS)[:-_MAX_KEPT]:
            if not _JOBS[old].alive:
                del _JOBS[old]
        return job


def get(job_id: str | None) -> Job | None:
    with _LOCK:
        return _JOBS.get(job_id) if job_id else None


def current() -> Job | None:
    """The running job, else the most recently started one (what a freshly loaded page shows)."""
    with _LOCK:
        jobs = list(_JOBS.values())
    for job in reversed(jobs):
        if job.alive:
            return job
    return jobs[-1] if jobs else None


def all_jobs() -> list[Job]:
    with _LOCK:
        return list(_JOBS.values())


def clear_finished() -> None:
    """Forget finished jobs (tests; a long-lived app keeps the last ``_MAX_KEPT``)."""
    with _LOCK:
        for key in [k for k, j in _JOBS.items() if not j.alive]:
            del _JOBS[key]
