"""Atomic writes give files the mode any other file of the user's would have."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lora_trainer import fsutil
from lora_trainer.llm.checkpoint import write_folder_atomic
from lora_trainer.lora.files import save_lora_file


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_current_umask_reads_without_changing(umask: int) -> None:
    assert fsutil.current_umask() == umask
    assert fsutil.current_umask() == umask


def test_new_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    text = fsutil.atomic_write_text(tmp_path / "a.txt", "x")
    lora = save_lora_file(tmp_path / "b.safetensors", {"lora_unet_x.alpha": torch.tensor(1.0)}, {})
    folder = write_folder_atomic(tmp_path / "adapter", lambda d: (d / "f.json").write_text("{}"))
    assert _mode(text) == _mode(lora) == 0o666 & ~umask
    assert _mode(folder) == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask: int) -> None:
    target = tmp_path / "metadata.csv"
    target.write_text("file_name,caption\n")
    os.chmod(target, 0o664)
    fsutil.atomic_write_text(target, "file_name,caption\na.png,a cat\n")
    assert _mode(target) == 0o664 and "a cat" in target.read_text()
    os.chmod(target, 0o600)
    fsutil.atomic_write_bytes(target, b"x")
    assert _mode(target) == 0o600
