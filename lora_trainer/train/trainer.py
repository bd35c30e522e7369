"""The Trainer: callbacks out, commands in, one readable loop.

``Trainer(config, host).run()`` trains a LoRA and writes it into ``host.lora_dir(config)``. A UI
runs it with ``.start()`` in a worker thread, reads ``.state.snapshot()`` and calls ``.stop()``,
``.save_now()``, ``.sample_now()``; the CLI runs it in the main thread with a progress callback.
The model comes from the host as a :class:`ModelBundle`, so the same loop trains a standalone
diffusers model and the WebUI's live model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lora_trainer.config import TrainConfig
from lora_trainer.errors import DeviceMemoryError, OutputError, one_line
from lora_trainer.locks import WaitCancelled
from lora_trainer.train.events import Callback, TrainEvent, WorkerRun, emit
from lora_trainer.train.result import TrainResult
from lora_trainer.train.session import RunSession
from lora_trainer.train.stopping import stop_on_signals

if TYPE_CHECKING:
    from lora_trainer.bench.estimate import MemoryEstimate
    from lora_trainer.hosts.base import Host
    from lora_trainer.models.bundle import ModelBundle

log = logging.getLogger(__name__)

# The status line while another job holds the host's model (a WebUI generation, a test render)
WAITING = ("waiting for the model: another job is using it (a generation or a render); training starts "
           "when it ends, Stop cancels")


def _as_output_error(error: OSError, output_dir: str, name: str) -> BaseException:
    """A full disk or a read-only folder met outside the savers' own checks, as one line."""
    from lora_trainer.fsutil import write_problem
    from lora_trainer.train.checkpoint import resume_hint

    problem = write_problem(error)
    if problem is None:
        return error
    return OutputError(f"cannot write {error.filename or output_dir}: {problem}; {resume_hint(output_dir, name)}")


def _as_memory_error(error: BaseException, cfg: TrainConfig, estimate: MemoryEstimate | None = None) -> BaseException:
    """A device's out-of-memory error as one line saying which of the run's settings to change
    (torch's own message is a paragraph about the allocator) and, when the run was estimated,
    what its settings need; anything else as it is."""
    import re

    import torch

    from lora_trainer.bench.estimate import needed_gb
    from lora_trainer.train.memory_check import memory_fixes

    text = str(error)
    if not (isinstance(error, torch.cuda.OutOfMemoryError)
            or (isinstance(error, RuntimeError) and "out of memory" in text.lower())):
        return error
    asked = re.search(r"Tried to allocate ([\d.]+ [KMG]iB)", text)
    total = re.search(r"total capacity of ([\d.]+ [KMG]iB)", text)
    needed = estimate and f"these settings are estimated to need {needed_gb(estimate):.1f} GiB"
    detail = ", ".join(filter(None, (asked and f"{asked.group(1)} more asked", total and f"{total.group(1)} in all",
                                     needed)))
    return DeviceMemoryError(
        f"the GPU ran out of memory{f' ({detail})' if detail else ''}: {', or '.join(memory_fixes(cfg))}; the tab's "
        "'auto' preset picks settings that fit this card, and 'python -m lora_trainer bench --estimate' "
        "shows what settings need")


def with_run_precision(cfg: TrainConfig, host: Host, bundle: ModelBundle) -> TrainConfig:
    """``cfg`` with ``train.mixed_precision: auto`` made the precision this run trains in, once
    the run holds its model (``resolve_mixed_precision``): with a host's model (a WebUI's, which it
    may load or switch until then) the dtype its UNet computes in; standalone the device's, as the
    host chose the weights' dtype by. The run's saved config, its LoRA's metadata and a resume of
    it name what it trained in."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    import torch

    from lora_trainer.config import build_config
    from lora_trainer.models.loaders import resolve_mixed_precision

    host_dtype = bundle.dtype if host.loaded_model() is not None else None
    precision = resolve_mixed_precision("auto", torch.device(bundle.device), host_dtype)
    return build_config({"train.mixed_precision": precision}, base=cfg)


class Trainer(WorkerRun):
    def __init__(self, config: TrainConfig, host: Host, callbacks: list[Callback] | None = None) -> None:
        super().__init__(callbacks)
        self.config = config
        self.host = host
        self.result: TrainResult | None = None
        self.memory_estimate: MemoryEstimate | None = None  # the run's, when it was estimated (on a GPU)

    # -- events out ----------------------------------------------------------------------
    def emit(self, ev: TrainEvent) -> None:
        emit([self.state.update, *self.callbacks, self.host.on_event], ev)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train (blocking) and return the result; errors are emitted as an "error" event and raised."""
        try:
            with stop_on_signals(self.commands.request_stop, lambda: self.commands.stop_requested):
                try:
                    self.result = self._run()
                except OSError as e:
                    converted = _as_output_error(e, self.config.output.output_dir, self.config.output.output_name)
                    if converted is e:
                        raise
                    raise converted from e
                except RuntimeError as e:
                    converted = _as_memory_error(e, self.config, self.memory_estimate)
                    if converted is e:
                        raise
                    # the traceback's frames hold the failed step's tensors: let them go with it
                    e.__traceback__ = None
                    raise converted from None
        except BaseException as e:
            self.emit(TrainEvent("error", message=one_line(e)))
            raise
        r = self.result
        kind = "stopped" if r.stopped else "done"
        self.emit(TrainEvent(kind, step=r.steps, loss=r.final_loss, path=str(r.lora_path) if r.lora_path else None,
                             message=f"{kind}: {r.lora_path}" if r.lora_path else f"{kind} before the first step; "
                                                                                   "nothing was written"))
        return r

    def _run(self) -> TrainResult:
        from lora_trainer.data.scan import scan_dataset
        from lora_trainer.train.preflight import preflight

        # The config and the dataset are checked before a model is loaded: a mistake there
        # fails in seconds, not at the first save.
        preflight(self.config, self.host)
        self.emit(TrainEvent("status", message="checking the dataset"))
        report = scan_dataset(self.config.data)
        self.emit(TrainEvent("status", message=report.summary()))
        try:
            with self.host.lock(self._waiting()):
                bundle = self.host.acquire_bundle(self.config)
                self.config = with_run_precision(self.config, self.host, bundle)
                session = RunSession(self, self.host, bundle, report)
                try:
                    return session.execute()
                finally:
                    try:
                        session.cleanup()
                    finally:
                        self.host.release_bundle(bundle)
        except WaitCancelled:
            # Stop while another job held the model: nothing was loaded, trained or written
            return TrainResult(lora_path=None, steps=0, final_loss=None, stopped=True,
                               output_dir=Path(self.config.output.output_dir).expanduser())

    def _waiting(self) -> Callable[[], bool]:
        """What the host's lock asks while another job (a WebUI generation, a render) holds it:
        the first time a status line says so; Stop ends the wait."""
        said: list[bool] = []

        def waiting() -> bool:
            if not said:
                said.append(True)
                self.emit(TrainEvent("status", message=WAITING))
            return not self.commands.stop_requested

        return waiting
