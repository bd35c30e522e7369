"""Stand-in for ``modules/call_queue.py`` (v1.10.1): the WebUI's queue lock around GPU work."""

import threading
from functools import wraps

from modules import shared


class FIFOLock:
    """Like ``modules.fifo_lock.FIFOLock``: a non-reentrant lock served in arrival order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acquired_by: list[int] = []  # test aid

    def acquire(self, blocking: bool = True) -> bool:
        ok = self._lock.acquire(blocking)
        if ok:
            self.acquired_by.append(threading.get_ident())
        return ok

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


queue_lock = FIFOLock()


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job="wrapped")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()
    return f
