"""Stand-in for ``modules/shared_state.py`` (v1.10.1): the progress/interrupt object ``shared.state``."""

import time


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    sampling_step = 0
    sampling_steps = 0
    current_image = None
    id_live_preview = 0
    textinfo = None
    time_start = None

    def __init__(self) -> None:
        self.history: list[dict] = []  # test aid: every state change we were shown

    def interrupt(self) -> None:
        self.interrupted = True

    def begin(self, job: str = "(unknown)") -> None:
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.current_image = None
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job

    def end(self) -> None:
        self.job = ""
        self.job_count = 0

    def assign_current_image(self, image) -> None:
        self.current_image = image
        self.id_live_preview += 1

    def dict(self) -> dict:
        return {"interrupted": self.interrupted, "job": self.job, "job_count": self.job_count,
                "job_no": self.job_no, "sampling_step": self.sampling_step, "sampling_steps": self.sampling_steps}
