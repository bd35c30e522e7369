"""A stopped run exits with its own code; SIGTERM stops like the first Ctrl-C (real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer.train.stopping import EXIT_STOPPED
from tests.train_helpers import make_data

ROOT = Path(__file__).resolve().parents[1]


def _train(data: Path, out: Path) -> subprocess.Popen[str]:
    sets = {"base_model": "demo", "model.device": "cpu", "train_data_dir": str(data), "resolution": 64,
            "enable_buckets": "false", "min_image_size": 32, "lora_rank": 2, "max_train_steps": 100000,
            "save_steps": 0, "output_dir": str(out), "output_name": "sig", "output.tensorboard": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", "train", "--no-progress", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_step_line(proc: subprocess.Popen[str]) -> list[str]:
    """Read stdout until the first progress line ("step 10/100000 ..."): the loop is running."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            return lines
    raise AssertionError(f"the run ended before a step: {''.join(lines)}{proc.stderr.read() if proc.stderr else ''}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_run_with_a_checkpoint_and_its_exit_code(tmp_path: Path, sig: signal.Signals) -> None:
    data = make_data(tmp_path / "data", n=2)
    out = tmp_path / "out"
    proc = _train(data, out)
    try:
        _wait_for_a_step_line(proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=600)  # a safety net only: the run stops at the next step
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STOPPED, stderr
    assert "stopped early" in stdout and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and 10 <= summary["steps"] < 100000
    assert (out / "sig.safetensors").is_file()
    assert (out / "checkpoints" / "sig" / f"step-{summary['steps']:06d}").is_dir()


def test_train_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    from lora_trainer.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"{EXIT_STOPPED} stopped early" in " ".join(capsys.readouterr().out.split())
