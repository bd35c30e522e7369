"""The Trainer: callbacks out, commands in, one readable loop.

``Trainer(config, host).run()`` trains a LoRA and writes it into ``host.lora_dir(config)``. A UI
runs it with ``.start()`` in a worker thread, reads ``.state.snapshot()`` and calls ``.stop()``,
``.save_now()``, ``.sample_now()``; the CLI runs it in the main thread with a progress callback.
The model comes from the host as a :class:`ModelBundle`, so the same loop trains a standalone
diffusers model and the WebUI's live model.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_trainer.config import TrainConfig
from lora_trainer.errors import one_line
from lora_trainer.train.events import Callback, TrainEvent, WorkerRun, emit
from lora_trainer.train.session import RunSession

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    lora_path: Path | None
    steps: int
    final_loss: float | None
    stopped: bool
    output_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(WorkerRun):
    def __init__(self, config: TrainConfig, host: Any = None, callbacks: list[Callback] | None = None) -> None:
        super().__init__(callbacks)
        self.config = config
        self.host = host
        self.result: TrainResult | None = None

    # -- events out ----------------------------------------------------------------------
    def emit(self, ev: TrainEvent) -> None:
        sinks: list[Callback] = [self.state.update, *self.callbacks]
        if self.host is not None and hasattr(self.host, "on_event"):
            sinks.append(self.host.on_event)
        emit(sinks, ev)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train (blocking) and return the result; errors are emitted as an "error" event and raised."""
        restore_sigint = self._install_sigint()
        try:
            self.result = self._run()
        except BaseException as e:
            self.emit(TrainEvent("error", message=one_line(e)))
            raise
        finally:
            restore_sigint()
        r = self.result
        self.emit(TrainEvent("stopped" if r.stopped else "done", step=r.steps, loss=r.final_loss,
                             path=str(r.lora_path) if r.lora_path else None,
                             message=f"{'stopped' if r.stopped else 'done'}: {r.lora_path}"))
        return r

    def _run(self) -> TrainResult:
        from lora_trainer.data.scan import scan_dataset

        # The dataset is scanned before a model is loaded: a mistake there fails in seconds.
        self.emit(TrainEvent("status", message="checking the dataset"))
        report = scan_dataset(self.config.data)
        self.emit(TrainEvent("status", message=report.summary()))
        if self.host is None:
            from lora_trainer.hosts.standalone import StandaloneHost

            self.host = StandaloneHost()
        with self.host.lock():
            bundle = self.host.acquire_bundle(self.config)
            session = RunSession(self, self.host, bundle, report)
            try:
                return session.execute()
            finally:
                try:
                    session.cleanup()
                finally:
                    self.host.release_bundle(bundle)

    def _install_sigint(self) -> Any:
        """First Ctrl-C: stop after this step (checkpoint + LoRA). Second: abort at once."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.commands.stop_requested:
                raise KeyboardInterrupt
            log.warning("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")
            self.commands.request_stop()

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)
