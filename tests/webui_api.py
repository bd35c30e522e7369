"""Test helper: the extension's HTTP API routes on a FastAPI app, as a WebUI stand-in starts them."""

from __future__ import annotations

import time
from typing import Any


def client(script_callbacks: Any) -> Any:
    """A TestClient over an app on which ``on_app_started`` callbacks registered their routes."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def wait(api: Any, job_id: str, timeout: float = 300) -> dict:
    """Poll /lora_trainer/status until the job has finished (the API has no blocking call)."""
    end = time.time() + timeout
    st: dict = {}
    while time.time() < end:
        st = api.get("/lora_trainer/status", params={"job_id": job_id}).json()
        if st["status"] not in ("running", "starting"):
            return st
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not finish: {st}")
