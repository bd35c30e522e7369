"""``python -m lora_trainer caption`` and ``caption tags`` end to end, in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.cli import main
from lora_trainer.data.captions import read_metadata_csv, read_sidecar
from tests.caption_models import make_images, save_tiny_blip, save_tiny_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"blip": save_tiny_blip(root / "blip"), "clip": save_tiny_clip(root / "clip")}


def test_caption_command_blip_and_clip(tmp_path: Path, models: dict[str, Path], capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    make_images(data, 3)
    argv = ["caption", "--input", str(data), "--model", "both", "--format", "both", "--trigger", "sks",
            "--suffix", "tiny", "--blip-model", str(models["blip"]), "--clip-model", str(models["clip"]),
            "--min-score", "-1", "--max-length", "8", "--batch-size", "2", "--device", "cpu"]
    assert main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr()
    assert "would write 3 caption(s)" in out.out and "img_0.png: sks, " in out.out
    assert not (data / "metadata.csv").exists()
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "wrote 3 caption(s)" in out.out
    assert "3/3" in out.err  # the progress bar
    rows = read_metadata_csv(data / "metadata.csv")
    assert len(rows) == 3
    for rel, text in rows.items():
        assert text.startswith("sks, ") and text.endswith(", tiny")
        assert read_sidecar(data / rel) == text


def test_output_is_lora_scripts_name_for_metadata(tmp_path: Path, models: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    make_images(data, 2)
    target = data / "captions.csv"
    assert main(["caption", "--input", str(data), "--output", str(target), "--blip-model", str(models["blip"]),
                 "--max-length", "8", "--device", "cpu"]) == 0
    assert len(read_metadata_csv(target)) == 2 and not (data / "metadata.csv").exists()


def test_caption_command_missing_weights_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "data", 1)
    missing = tmp_path / "blip-folder"
    assert main(["caption", "--input", str(tmp_path / "data"), "--blip-model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "data" / "metadata.csv").exists()


def test_tags_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_images(tmp_path, 3)
    (tmp_path / "metadata.csv").write_text(
        "filename,prompt\nimg_0.png,\"cat, red, cat, blurry\"\nimg_1.jpg,\"dog, red\"\nimg_2.png,tree\n",
        encoding="utf-8")
    argv = ["caption", "tags", "--input", str(tmp_path), "--replace", "cat", "kitten", "--remove", "blurry",
            "--dedupe", "--add-trigger", "sks", "--sort", "--freq"]
    assert main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change 3 of 3" in out and "+ sks, kitten, red" in out
    assert read_metadata_csv(tmp_path / "metadata.csv")["img_0.png"] == "cat, red, cat, blurry"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert read_metadata_csv(tmp_path / "metadata.csv") == {
        "img_0.png": "sks, kitten, red", "img_1.jpg": "sks, dog, red", "img_2.png": "sks, tree"}
    assert "changed 3 of 3" in out and "backups: 1" in out
    freq_lines = [line.split() for line in out.splitlines() if line.startswith(("sks", "red"))]
    assert ["sks", "3", "100%"] in freq_lines and ["red", "2", "67%"] in freq_lines
    assert main(["caption", "tags", "--input", str(tmp_path), "--replace", "(", "x", "--regex"]) == 2
