"""One training or captioning job at a time, for scripted use (the WebUI's HTTP API routes).

Host-agnostic: ``JobManager(host)`` starts a Trainer or a captioning run in a worker thread,
stops it, and reports a JSON-ready snapshot. The WebUI script maps its routes onto it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from lora_trainer.errors import ConfigError, HostError, LoraTrainerError, one_line, report_failure

log = logging.getLogger(__name__)


class JobManager:
    def __init__(self, host: Any) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._job: dict[str, Any] | None = None

    def busy(self) -> bool:
        job = self._job
        return job is not None and job["thread"].is_alive()

    def _claim(self, kind: str) -> dict[str, Any]:
        with self._lock:
            if self.busy():
                raise HostError(f"a {self._job['kind']} job ({self._job['id']}) is still running; "
                                "stop it or wait for it to finish")
            self._job = {"id": uuid.uuid4().hex[:12], "kind": kind, "status": "starting", "error": None,
                         "result": None, "trainer": None, "progress": None, "thread": threading.Thread()}
            return self._job

    def start_train(self, payload: dict[str, Any]) -> str:
        """``payload``: a config as nested sections, dotted keys or flat aliases (as in YAML).

        The run goes into the tab's job registry, so a run started here shows in the tab too
        (and the tab's one-run-at-a-time rule covers both)."""
        from lora_trainer.config import build_config, flatten_user_dict
        from lora_trainer.ui import jobs as runs

        config = build_config(flatten_user_dict(payload, source="request"))
        job = self._claim("train")
        try:
            run = runs.start(config, self.host)
        except LoraTrainerError:
            self._job = None
            raise
        job.update(trainer=run.trainer, thread=run.thread, status="running")
        return job["id"]

    @staticmethod
    def _train_outcome(job: dict[str, Any]) -> None:
        """Fill a finished training job's status/result/error from its trainer."""
        trainer = job["trainer"]
        if trainer.error is not None:
            job["status"], job["error"] = "error", one_line(trainer.error)
        elif trainer.result is not None:
            r = trainer.result
            job["result"] = {"lora_path": str(r.lora_path) if r.lora_path else None,
                             "steps": r.steps, "final_loss": r.final_loss, "stopped": r.stopped}
            job["status"] = "stopped" if r.stopped else "done"

    def start_caption(self, payload: dict[str, Any]) -> str:
        """``payload``: folder, and optionally model ("blip"/"clip"/"both"), format, trigger, mode."""
        from lora_trainer.caption.run import caption_folder

        folder = payload.get("folder")
        if not folder:
            raise ConfigError("caption request needs 'folder' (the image folder to caption)")
        job = self._claim("caption")

        def progress(done: int, total: int, name: str) -> None:
            job["progress"] = {"done": done, "total": total, "current": name}

        def work() -> None:
            try:
                cap = getattr(self.host, "captioner", None)  # the host's own BLIP, if it has one
                with self.host.lock():
                    report = caption_folder(
                        folder, model=payload.get("model", "blip"), fmt=payload.get("format", "csv"),
                        trigger=payload.get("trigger"), mode=payload.get("mode", "overwrite"),
                        progress=progress, captioner=cap)
                job["result"] = {"captions": len(report.captions), "skipped": len(report.skipped),
                                 "unreadable": [r for r, _ in report.unreadable]}
                job["status"] = "done"
            except Exception as e:  # noqa: BLE001 - reported in the job's status and the log
                job["status"], job["error"] = "error", one_line(e)
                report_failure(log, "captioning", e)

        return self._run(job, work)

    def _run(self, job: dict[str, Any], work: Any) -> str:
        job["status"] = "running"
        job["thread"] = threading.Thread(target=work, name=f"lora-trainer-{job['kind']}", daemon=True)
        job["thread"].start()
        return job["id"]

    def stop(self, job_id: str | None = None) -> bool:
        job = self._job
        if job is None or (job_id and job_id != job["id"]) or not self.busy():
            return False
        if job["trainer"] is not None:
            job["trainer"].stop()
        return True

    def wait(self, timeout: float | None = None) -> None:
        if self._job is not None:
            self._job["thread"].join(timeout)

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """JSON-ready: the job's id/kind/status/error/result and the run state without images."""
        job = self._job
        if job is None or (job_id and job_id != job["id"]):
            return {"id": job_id, "status": "unknown" if job_id else "idle"}
        if job["trainer"] is not None and job["status"] == "running" and not job["thread"].is_alive():
            self._train_outcome(job)
        out = {k: job[k] for k in ("id", "kind", "status", "error", "result", "progress")}
        if job["trainer"] is not None:
            snap = dict(job["trainer"].state.snapshot())
            snap["samples"] = [step for step, _ in snap.get("samples", [])]  # steps only, no images
            out["state"] = snap
        return out
