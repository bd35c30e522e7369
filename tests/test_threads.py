"""CPU threads: one per physical core this process may use, idle threads sleeping; --threads and
OMP_NUM_THREADS win; a tiny model gets one thread (lora_trainer.threads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer import threads
from lora_trainer.cli import main


def _topology(root: Path, cpus: dict[int, tuple[int, int]]) -> Path:
    for cpu, (package, core) in cpus.items():
        topo = root / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text(f"{package}\n")
        (topo / "core_id").write_text(f"{core}\n")
    return root


@pytest.fixture
def restore_threads() -> Any:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_hyperthread_siblings_count_once(tmp_path: Path) -> None:
    # 2 packages x 2 cores x 2 hyperthreads
    sys_root = _topology(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1),
                                    4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    assert threads.physical_cores(set(range(8)), sys_root) == 4
    assert threads.physical_cores({0, 4}, sys_root) == 1  # an affinity mask of one core's two threads
    assert threads.physical_cores({0, 9}, sys_root) == 2  # no topology for cpu9: counted as itself


def test_container_quota(tmp_path: Path) -> None:
    f = tmp_path / "cpu.max"
    f.write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(f) == 2
    f.write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(f) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing") is None


def test_the_choice_of_thread_count(monkeypatch: pytest.MonkeyPatch, restore_threads: None) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_cpu_threads", lambda: 3)
    assert threads.configure_cpu_threads() == 3
    assert threads.configure_cpu_threads(small_model=True) == 1
    assert threads.configure_cpu_threads(2) == 2  # --threads wins
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.configure_cpu_threads() == 1  # the user's OMP_NUM_THREADS is left alone


def test_commands_make_idle_openmp_threads_sleep(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # a user's choice stays
    assert "--threads" in capsys.readouterr().out


def test_train_threads_option(monkeypatch: pytest.MonkeyPatch, restore_threads: None, tmp_path: Path) -> None:
    import lora_trainer.train.cli as train_cli

    seen: list[int] = []
    monkeypatch.setattr(train_cli, "run_training", lambda cfg, progress=True: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "default_cpu_threads", lambda: 2)
    base = ["train", "--set", f"output_dir={tmp_path}"]
    assert main([*base, "--threads", "3"]) == 0
    assert main([*base, "--set", f"base_model={tmp_path / 'model.safetensors'}"]) == 0
    assert main(base) == 0  # the embedded demo model: one thread
    assert seen == [3, 2, 1]
    assert main([*base, "--threads", "0"]) == 2
