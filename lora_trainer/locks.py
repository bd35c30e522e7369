"""Holding a lock another job may hold, with a wait that can be given up.

A training run holds its host's lock for the whole run: in a WebUI the queue lock its own
generations take. A run started while a generation holds it waits; the user may stop it
meanwhile, so the wait asks ``waiting()`` a few times a second whether to go on.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Called while a lock is busy: True to go on waiting, False to give up.
Waiting = Callable[[], bool]


class WaitCancelled(Exception):
    """The wait for a busy lock was given up (``waiting()`` said so); nothing was held."""


@contextlib.contextmanager
def hold(lock: Any, waiting: Waiting | None = None, every: float = 0.25) -> Iterator[None]:
    """Hold ``lock`` (``acquire(blocking)`` / ``release()``: a ``threading.Lock``, A1111's
    ``FIFOLock``) for the block. While it is busy, ``waiting()`` is asked at once and then every
    ``every`` seconds; when it says False the wait ends with :class:`WaitCancelled`.

    A thread of its own waits with a blocking ``acquire``, so a lock that serves waiters in
    arrival order (the WebUI's queue) still does; a lock that comes after the wait was given up
    is released at once."""
    if not lock.acquire(False):
        if waiting is None:
            lock.acquire()
        else:
            _wait_for(lock, waiting, every)
    try:
        yield
    finally:
        lock.release()


def _wait_for(lock: Any, waiting: Waiting, every: float) -> None:
    got, gave_up, guard = threading.Event(), threading.Event(), threading.Lock()

    def take() -> None:
        lock.acquire()
        with guard:
            if gave_up.is_set():
                lock.release()
            else:
                got.set()

    threading.Thread(target=take, name="lora-trainer-lock", daemon=True).start()
    while not got.is_set():
        if not waiting():
            with guard:
                if not got.is_set():
                    gave_up.set()
                    raise WaitCancelled("the wait for the lock was given up")
            return
        got.wait(every)
