"""``prepare`` command output and exit codes; the procedural demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.config import DataConfig
from lora_trainer.data.demo import make_demo_dataset
from lora_trainer.data.scan import scan_dataset


def _dataset(folder: Path, bad: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate([(1024, 512), (512, 512), (600, 600)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    if bad:
        (folder / "broken.jpg").write_bytes(b"not a jpeg")
        (folder / "broken.txt").write_text("b", encoding="utf-8")
    return folder


def test_prepare_ready(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["prepare", "--input", str(_dataset(tmp_path / "ds"))])
    out = capsys.readouterr().out
    assert rc == 0
    assert "3 usable" in out and "512x512: 2" in out and "704x320: 1" in out and "ready to train" in out


def test_prepare_resolution_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "ds")
    assert main(["prepare", "--input", str(ds), "--resolution", "256"]) == 0
    out = capsys.readouterr().out  # min_bucket_reso 256 leaves only the square
    assert "resolution 256" in out and "256x256: 3" in out and "only one bucket" in out
    assert main(["prepare", "--input", str(ds), "--resolution", "256", "--set", "data.bucket_step=32",
                 "--set", "min_bucket_reso=128"]) == 0
    out = capsys.readouterr().out
    assert "256x256: 2" in out and "352x160: 1" in out and "only one bucket" not in out


def test_prepare_skip_vs_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "ds", bad=True)
    assert main(["prepare", "--input", str(ds)]) == 0
    assert "corrupt 1 (skipped)" in capsys.readouterr().out
    assert main(["prepare", "--input", str(ds), "--on-invalid", "stop"]) == 2
    captured = capsys.readouterr()
    assert "not ready to train" in captured.out
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error:") and "broken.jpg (corrupt)" in err_lines[0]


def test_prepare_from_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "ds", bad=True)
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"data:\n  train_data_dir: {ds.as_posix()}\n  on_invalid: stop\n", encoding="utf-8")
    assert main(["prepare", "--config", str(cfg)]) == 2
    assert main(["prepare", "--config", str(cfg), "--on-invalid", "skip"]) == 0


def test_prepare_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "ds", bad=True)
    assert main(["prepare", "--input", str(ds), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] is True and data["error"] is None
    assert data["usable_images"] == 3 and data["problem_counts"] == {"corrupt": 1}
    assert {"width": 512, "height": 512, "count": 2} in data["buckets"]
    assert main(["prepare", "--input", str(ds), "--json", "--on-invalid", "stop"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["trainable"] is False and "broken.jpg" in data["error"]


def test_prepare_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for argv in (["prepare"], ["prepare", "--input", str(tmp_path / "missing")],
                 ["prepare", "--input", str(tmp_path / "empty")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")


def test_demo_dataset_is_valid_and_idempotent(tmp_path: Path) -> None:
    folder = make_demo_dataset(tmp_path / "demo", n=8)
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"demo_{i:03d}.png" for i in range(8)] + ["metadata.csv"]
    r = scan_dataset(DataConfig(train_data_dir=str(folder), resolution=128, on_invalid="stop"))
    assert len(r.items) == 8 and all((i.width, i.height) == (128, 128) for i in r.items)
    assert r.items[0].caption == "a red circle on a pink background"
    assert len({i.caption for i in r.items}) == 8
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    make_demo_dataset(folder, n=8)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()} == first
    assert not (folder / ".backup").exists()


def test_demo_dataset_backs_up_a_foreign_file(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "metadata.csv").write_text("filename,prompt\nmine.png,my caption\n", encoding="utf-8")
    make_demo_dataset(folder, n=2)
    backups = list((folder / ".backup").iterdir())
    assert len(backups) == 1 and "my caption" in backups[0].read_text(encoding="utf-8")
    assert "demo_001.png" in (folder / "metadata.csv").read_text(encoding="utf-8")
