"""The job registry: one place for every training run, whoever started it (tab or HTTP API).

A run lives in a worker thread owned by this module, not by a gradio session, so reloading the
page or closing the browser does not stop it; the tab polls :func:`current` and shows the
running (or last finished) job again, also one started through the WebUI's API. One
image-training run at a time per process: the model and the GPU are shared.

:class:`ApiJobs` is the WebUI API's view of the same registry (JSON-ready status, payloads as
configs) plus folder captioning, which the API runs as a job of its own. The registry knows a
``Host`` and a trainer, never a WebUI and never the tab.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.errors import ConfigError, HostError, one_line, report_failure

if TYPE_CHECKING:
    from lora_trainer.config import TrainConfig
    from lora_trainer.hosts.base import Host

log = logging.getLogger(__name__)

# A trainer as the registry needs it: ``.start() -> Thread``, ``.state.snapshot()``, ``.stop()``,
# ``.save_now()``, ``.sample_now()``, and after the run ``.error``/``.result``
# (lora_trainer.train.trainer.Trainer).
TrainerFactory = Callable[..., Any]


@dataclass
class Job:
    id: str
    config: TrainConfig
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
                    output_name=self.config.output.output_name,
                    max_train_steps=self.config.train.max_train_steps)
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
_START_HOOKS: dict[str, Callable[[TrainConfig], None]] = {}  # by name: a rebuilt tab replaces its own


def on_start(name: str, hook: Callable[[TrainConfig], None] | None) -> None:
    """Call ``hook(config)`` for every run started from now on, the tab's and the API's (a
    WebUI's tab remembers where runs go); None: no longer. A hook that fails is logged; the run
    still starts."""
    with _LOCK:
        if hook is None:
            _START_HOOKS.pop(name, None)
        else:
            _START_HOOKS[name] = hook


def default_trainer_factory(config: TrainConfig, host: Host, callbacks: list[Any]) -> Any:
    from lora_trainer.train.preflight import preflight
    from lora_trainer.train.trainer import Trainer

    preflight(config, host)  # a bad name or folder is refused at Start, before a thread or a model
    return Trainer(config, host=host, callbacks=callbacks)


def start(config: TrainConfig, host: Host, *, callbacks: list[Any] | None = None,
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
        for name, hook in _START_HOOKS.items():
            try:
                hook(config)
            except Exception:  # noqa: BLE001 - remembering where a run went must never stop it
                log.warning("%s failed for run '%s'", name, config.output.output_name, exc_info=True)
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


def clear_start_hooks() -> None:
    """Forget every :func:`on_start` hook (tests: a tab built by one test remembers nothing of
    another's runs)."""
    with _LOCK:
        _START_HOOKS.clear()


def clear_finished() -> None:
    """Forget finished jobs (tests; a long-lived app keeps the last ``_MAX_KEPT``)."""
    with _LOCK:
        for key in [k for k, j in _JOBS.items() if not j.alive]:
            del _JOBS[key]


def _train_status(job: Job) -> dict[str, Any]:
    """JSON-ready status of a registry job: status/error/result and the run state without images."""
    trainer = job.trainer
    out: dict[str, Any] = {"id": job.id, "kind": "train", "status": "running", "error": None, "result": None,
                           "progress": None}
    if not job.alive:
        if getattr(trainer, "error", None) is not None:
            out["status"], out["error"] = "error", one_line(trainer.error)
        elif getattr(trainer, "result", None) is not None:
            r = trainer.result
            out["result"] = {"lora_path": str(r.lora_path) if r.lora_path else None,
                             "output_dir": str(Path(r.output_dir).absolute()),  # samples, logs, checkpoints
                             "steps": r.steps, "final_loss": r.final_loss, "stopped": r.stopped}
            out["status"] = "stopped" if r.stopped else "done"
        else:
            out["status"] = job.snapshot()["status"]
    snap = dict(trainer.state.snapshot())
    snap["samples"] = [step for step, _ in snap.get("samples", [])]  # steps only, no images
    out["state"] = snap
    return out


class ApiJobs:
    """The WebUI HTTP API's jobs: training runs go into the registry above (so the tab shows
    them and its one-run rule covers both); a captioning run is kept here. One at a time."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._caption: dict[str, Any] | None = None
        self._train_ids: list[str] = []
        self._counter = itertools.count(1)

    def _caption_alive(self) -> bool:
        return self._caption is not None and self._caption["thread"].is_alive()

    def busy(self) -> bool:
        job = current()
        return self._caption_alive() or (job is not None and job.alive)

    def _refuse_if_captioning(self) -> None:
        if self._caption_alive():
            raise HostError(f"captioning job {self._caption['id']} is still running; wait for it to finish")

    def start_train(self, payload: dict[str, Any]) -> str:
        """``payload``: a config as nested sections, dotted keys or flat aliases (as in YAML)."""
        from lora_trainer.config import build_config, flatten_user_dict

        config = build_config(flatten_user_dict(payload, source="request"))
        loaded = self.host.loaded_model()
        if loaded is not None:
            loaded.require_trainable()  # Flux, no checkpoint, ...: one line, before any work
        with self._lock:
            self._refuse_if_captioning()
            job = start(config, self.host)
            self._train_ids.append(job.id)
        return job.id

    def start_caption(self, payload: dict[str, Any]) -> str:
        """``payload``: folder, and optionally model ("blip"/"clip"/"both"), format, trigger, mode."""
        folder = payload.get("folder")
        if not folder:
            raise ConfigError("caption request needs 'folder' (the image folder to caption)")
        with self._lock:
            self._refuse_if_captioning()
            running = current()
            if running is not None and running.alive:
                raise HostError(f"training run {running.id} is still running; stop it or wait for it to finish")
            job: dict[str, Any] = {"id": f"caption{next(self._counter)}", "kind": "caption", "status": "running",
                                   "error": None, "result": None, "progress": None}
            job["thread"] = threading.Thread(target=self._caption_work, args=(job, payload),
                                             name="lora-trainer-caption", daemon=True)
            self._caption = job
            job["thread"].start()
        return job["id"]

    def _caption_work(self, job: dict[str, Any], payload: dict[str, Any]) -> None:
        from lora_trainer.caption.run import caption_folder

        def progress(done: int, total: int, name: str) -> None:
            job["progress"] = {"done": done, "total": total, "current": name}

        try:
            with self.host.lock():
                report = caption_folder(
                    payload["folder"], model=payload.get("model", "blip"), fmt=payload.get("format", "csv"),
                    trigger=payload.get("trigger"), mode=payload.get("mode", "overwrite"),
                    progress=progress, captioner=self.host.captioner)
            job["result"] = {"captions": len(report.captions), "skipped": len(report.skipped),
                             "unreadable": [r for r, _ in report.unreadable]}
            job["status"] = "done"
        except Exception as e:  # noqa: BLE001 - reported in the API's status and the log
            job["status"], job["error"] = "error", one_line(e)
            report_failure(log, "captioning", e)

    def stop(self, job_id: str | None = None) -> bool:
        """Stop the running training job (``job_id``: only if it is that one)."""
        job = current()
        if job is None or not job.alive or (job_id and job_id != job.id):
            return False
        job.stop()
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._caption is not None:
            self._caption["thread"].join(timeout)
        job = current()
        if job is not None:
            job.join(timeout)

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """JSON-ready status of ``job_id``, or of the latest job when none is given."""
        if job_id is None:
            latest = self._latest()
            if latest is None:
                return {"id": None, "status": "idle"}
            job_id = latest
        if self._caption is not None and self._caption["id"] == job_id:
            return {k: self._caption[k] for k in ("id", "kind", "status", "error", "result", "progress")}
        job = get(job_id)
        if job is None:
            return {"id": job_id, "status": "unknown"}
        return _train_status(job)

    def _latest(self) -> str | None:
        if self._caption_alive():
            return self._caption["id"]
        job = current()
        if job is not None and (job.alive or job.id in self._train_ids):
            return job.id
        return self._caption["id"] if self._caption is not None else None
