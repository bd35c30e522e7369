"""A full disk or a read-only folder: one line saying what, where and what to do; nothing half-written."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_trainer.cli import main
from lora_trainer.errors import OutputError
from lora_trainer.fsutil import space_problem, write_problem
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config

# What torch's zip writer says when the disk fills up in the middle of torch.save.
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:783] . unexpected pos 298560 vs 298448"
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"), n=2)


@pytest.fixture(scope="module")
def host() -> TinyHost:
    return TinyHost("sd1")


def _cli_args(data: Path, out: Path, *sets: str) -> list[str]:
    base = ["base_model=demo", "model.device=cpu", f"train_data_dir={data}", "resolution=64", "enable_buckets=false",
            "min_image_size=32", "lora_rank=2", f"output_dir={out}", "output_name=tiny", "output.tensorboard=false",
            *sets]
    return ["train", "--no-progress", *[a for s in base for a in ("--set", s)]]


def test_disk_full_in_a_checkpoint_is_one_line_and_leaves_the_last_good_one(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real_save = torch.save
    calls: list[Any] = []

    def filling_up(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"\0" * 4096)  # what got onto the disk before it was full
        raise RuntimeError(TORCH_SHORT_WRITE)

    monkeypatch.setattr(torch, "save", filling_up)
    out = tmp_path / "out"
    rc = main(_cli_args(data, out, "max_train_steps=4", "save_steps=2"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "checkpoint step-000004 not written" in err and "the disk is full" in err
    assert str(out / "checkpoints" / "tiny" / "step-000002") in err and "resume=latest" in err
    assert [p.name for p in (out / "checkpoints" / "tiny").iterdir()] == ["step-000002"]  # no .partial folder left
    pos, lora, _ = ckpt.load_checkpoint(out / "checkpoints" / "tiny" / "step-000002")
    assert pos.step == 2 and lora
    assert lora_tensors(out / "tiny-step000004.safetensors")  # the LoRA went first, and is whole


def test_no_room_for_a_save_is_found_before_writing(tmp_path: Path, data: Path, host: TinyHost,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 1024))
    out = tmp_path / "out"
    cfg = tiny_config(data, out, **{"train.max_train_steps": 2, "train.save_steps": 1,
                                    "output.save_step_loras": False})
    with pytest.raises(OutputError) as e:
        Trainer(cfg, host=host).run()
    msg = str(e.value)
    assert "checkpoint step-000001 not written" in msg and "0.0 MB free" in msg and "no checkpoint" in msg
    assert not (out / "checkpoints").exists()  # nothing was started, so nothing is left half-written


def test_a_stop_writes_the_lora_before_the_checkpoint(tmp_path: Path, data: Path, host: TinyHost,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for the small LoRA but not for the checkpoint: the trained LoRA is kept."""
    monkeypatch.setattr(ckpt, "space_problem", lambda folder, need: "the disk has 0.5 MB free, about 2 MB are needed")
    trainer: Trainer

    def stop(ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.step == 1:
            trainer.stop()

    out = tmp_path / "out"
    trainer = Trainer(tiny_config(data, out, **{"train.max_train_steps": 5}), host=host, callbacks=[stop])
    with pytest.raises(OutputError, match="checkpoint step-000001 not written.*0.5 MB free"):
        trainer.run()
    assert lora_tensors(out / "tiny.safetensors")
    assert not list(out.glob(".*.tmp"))


def test_disk_full_for_the_final_lora(tmp_path: Path, data: Path, host: TinyHost, monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_trainer.lora.files as files

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        Trainer(tiny_config(data, out), host=host).run()
    msg = str(e.value)
    assert msg.startswith(f"LoRA {out / 'tiny.safetensors'} not written: the disk is full") and "\n" not in msg
    assert not list(out.glob(".*.tmp")) and not (out / "tiny.safetensors").exists()


def test_a_read_only_folder_mid_run_is_one_line(tmp_path: Path, data: Path, host: TinyHost,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import lora_trainer.fsutil as fsutil

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(fsutil.tempfile, "mkstemp", read_only)
    out = tmp_path / "out"
    with pytest.raises(OutputError) as e:
        Trainer(tiny_config(data, out), host=host).run()
    assert f"cannot write {out}: the file system is read-only" in str(e.value) and "\n" not in str(e.value)


def test_write_problems_in_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert write_problem(OSError(errno.ENOSPC, "No space left on device")) == "the disk is full"
    assert write_problem(OSError(errno.EROFS, "Read-only file system")) == "the file system is read-only"
    assert write_problem(RuntimeError(TORCH_SHORT_WRITE)).startswith("the disk is full")
    assert write_problem(ValueError("bad value")) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(100 << 20, 90 << 20, 10 << 20))
    assert space_problem(tmp_path / "not" / "yet", 5 << 20) is None
    assert space_problem(tmp_path, 20 << 20) == "the disk has 10 MB free, about 21 MB are needed"
