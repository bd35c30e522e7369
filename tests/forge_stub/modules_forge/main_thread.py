"""Stand-in for ``modules_forge/main_thread.py``: generations run as tasks on one thread.

In Forge the launcher's main thread runs ``loop()``; here a daemon thread does, started with the
first task. ``Task.work`` catches an exception, keeps its text in ``last_exception`` and leaves
the result None, as Forge's does.
"""

import threading
import traceback
from collections import deque

lock = threading.Lock()
condition = threading.Condition(lock)
last_id = 0
waiting_queue: deque = deque()
finished_tasks: dict = {}
last_exception = None
thread_names: list[str] = []  # test aid: the thread each task ran on
_loop_thread = None


class Task:
    def __init__(self, task_id, func, args, kwargs):
        self.task_id, self.func, self.args, self.kwargs, self.result = task_id, func, args, kwargs, None

    def work(self):
        global last_exception
        thread_names.append(threading.current_thread().name)
        try:
            self.result = self.func(*self.args, **self.kwargs)
            last_exception = None
        except Exception as e:  # noqa: BLE001 - as Forge: printed, kept as text
            traceback.print_exc()
            last_exception = f"{type(e).__name__}: {e}"


def loop():
    while True:
        with condition:
            while not waiting_queue:
                condition.wait(timeout=0.1)
            task = waiting_queue.popleft()
        task.work()
        with condition:
            finished_tasks[task.task_id] = task
            condition.notify_all()


def _ensure_loop():
    global _loop_thread
    if _loop_thread is None:
        _loop_thread = threading.Thread(target=loop, name="forge-main-thread", daemon=True)
        _loop_thread.start()


def async_run(func, *args, **kwargs):
    global last_id
    _ensure_loop()
    with condition:
        last_id += 1
        waiting_queue.append(Task(last_id, func, args, kwargs))
        condition.notify()
        return last_id


def run_and_wait_result(func, *args, **kwargs):
    task_id = async_run(func, *args, **kwargs)
    with condition:
        while task_id not in finished_tasks:
            condition.wait()
        return finished_tasks.pop(task_id).result
