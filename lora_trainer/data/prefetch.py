"""Load the next batches in a background thread while the current one trains.

Image decoding and resizing (PIL) and safetensors reads release the GIL, so one thread takes
data loading off the training step's critical path without the cost and the pitfalls of worker
processes (a WebUI's process cannot safely fork). Batches come out in the order the source
yields them; every random choice in a batch comes from that sample's own seed, so a prefetched
run trains on exactly the batches an unprefetched one does.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()
THREAD_NAME = "lt-prefetch"


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def prefetch(source: Iterable[T], depth: int = 2, prepare: Callable[[T], T] | None = None) -> Iterator[T]:
    """Yield ``source``'s items, keeping up to ``depth`` of them loaded ahead in a thread.

    ``prepare`` runs in the thread on each item (e.g. pinning tensors for a non-blocking copy).
    An error raised while loading is raised here, at the item it belongs to. Closing the
    generator (``return`` or ``break`` in a ``with contextlib.closing(...)`` block, or an
    error in the consumer) stops the thread. ``depth`` 0 loads in the caller's thread.
    """
    if depth <= 0:
        for item in source:
            yield prepare(item) if prepare else item
        return
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        items = iter(source)
        try:
            for item in items:
                if not put(prepare(item) if prepare else item):
                    return
            put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(_Failed(e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # a generator source runs its own cleanup in the thread that ran it

    thread = threading.Thread(target=work, name=THREAD_NAME, daemon=True)
    thread.start()
    try:
        while True:
            value = ready.get()
            if value is _DONE:
                return
            if isinstance(value, _Failed):
                raise value.error
            yield value
    finally:
        stop.set()
        thread.join(timeout=10)
