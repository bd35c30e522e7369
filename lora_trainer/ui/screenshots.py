"""Drive the app in headless Chromium: helpers for the browser tests, and the docs screenshots.

``python -m lora_trainer.ui.screenshots [--out docs]`` runs the browser test flow (demo model,
tiny captioner) with screenshots of each section saved to ``--out``. Needs Debian's ``chromium``
and ``chromium-driver`` and the ``selenium`` package; none of this is used by the app itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from lora_trainer.errors import HostError

# Flags for a headless Chromium that never reaches the network on its own.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1600"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(app: Any, port: int | None = None) -> str:
    """Serve ``app`` on 127.0.0.1 in the background (gradio's own server thread); its URL."""
    from lora_trainer.ui import compat

    port = port or free_port()
    app.queue()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **compat.launch_kwargs(getattr(app, "lt_css", None)))
    return f"http://127.0.0.1:{port}/"


def shutdown(app: Any, timeout: float = 10.0) -> None:
    """Stop the server. On gradio 3.x ``close()`` can wait forever for the periodic (``every=``)
    event stream to end, so it runs in a daemon thread that is given ``timeout`` seconds."""
    import threading

    closer = threading.Thread(target=app.close, name="lt-close-app", daemon=True)
    closer.start()
    closer.join(timeout)


def browser_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def chrome(profile_dir: str | Path | None = None) -> Any:
    """A Selenium driver for the system Chromium with a fresh profile and browser logs enabled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    if paths is None:
        raise HostError("chromium and chromedriver not found; install them: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir or tempfile.mkdtemp(prefix='lt-chromium-')}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(paths[1]), options=opts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_trainer.ui.screenshots", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="folder for the PNG files (default: docs)")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "LORA_TRAINER_SCREENSHOTS": str(Path(args.out).resolve())}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "browser", str(root / "tests" / "test_ui_browser.py")]
    return subprocess.call(cmd, cwd=root, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
