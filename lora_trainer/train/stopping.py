"""Stopping a run from outside: Ctrl-C, SIGTERM (``timeout``, ``docker stop``, a closed terminal).

The first signal asks the run to stop after the current step: it saves the LoRA and a checkpoint,
writes its summary and ends as "stopped". A second signal aborts at once. A run that stopped
early exits with :data:`EXIT_STOPPED`, so ``train && deploy`` never deploys half a run.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

# Exit code of a run that stopped early (resumable): 130, as shells report a Ctrl-C.
EXIT_STOPPED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], None], stop_requested: Callable[[], bool]) -> Iterator[None]:
    """While inside: the first SIGINT or SIGTERM calls ``request_stop``; the next raises
    KeyboardInterrupt. Only the main thread can own signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop_requested():
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        log.warning("%s: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", name)
        request_stop()

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
