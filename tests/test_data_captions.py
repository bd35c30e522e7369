"""metadata.csv and sidecars: hard text survives a write/read round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.data.captions import read_captions, read_metadata_csv, write_captions
from lora_trainer.errors import DatasetError

HARD = {
    "a.png": "1girl, red hair, \"quoted\", smile",
    "b.png": "first line\nsecond line, with a comma",
    "c.png": "一只在草地上的猫，阳光明媚, 中文标签",
    "sub/d.png": "emoji 🐱 and trailing spaces  ",
}


def _images(folder: Path, rels) -> None:
    for rel in rels:
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(p)


def test_csv_round_trip_with_quotes_newlines_and_chinese(tmp_path: Path) -> None:
    _images(tmp_path, HARD)
    write_captions(tmp_path, HARD, "csv")
    raw = (tmp_path / "metadata.csv").read_text(encoding="utf-8")
    assert raw.startswith("filename,prompt\n") and '"first line\nsecond line, with a comma"' in raw
    assert read_metadata_csv(tmp_path / "metadata.csv") == HARD
    assert read_captions(tmp_path) == HARD


def test_sidecar_round_trip_and_csv_precedence(tmp_path: Path) -> None:
    _images(tmp_path, HARD)
    write_captions(tmp_path, HARD, "txt")
    assert (tmp_path / "c.txt").read_text(encoding="utf-8") == HARD["c.png"]
    got = read_captions(tmp_path)
    assert got == {k: v.strip() for k, v in HARD.items()}  # sidecars are read stripped
    write_captions(tmp_path, {"a.png": "from csv"}, "csv")
    got = read_captions(tmp_path)
    assert got["a.png"] == "from csv" and got["b.png"] == HARD["b.png"]  # sidecars fill the rest


def test_bom_and_alternative_header(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_bytes("\ufefffile_name_unused,x\n".encode())
    with pytest.raises(DatasetError, match="header"):
        read_metadata_csv(p)
    p.write_bytes("\ufeffFilename,Caption\nx.png,hello\n".encode())
    assert read_metadata_csv(p) == {"x.png": "hello"}


def test_rewrite_backs_up_the_old_csv(tmp_path: Path) -> None:
    write_captions(tmp_path, {"a.png": "one"}, "csv")
    backups = write_captions(tmp_path, {"a.png": "two"}, "csv")
    assert len(backups) == 1 and "one" in backups[0].read_text(encoding="utf-8")


def test_hugging_face_header_is_read_and_kept(tmp_path: Path) -> None:
    """An ImageFolder dataset's metadata.csv ("file_name,text", maybe more columns) trains as is,
    and saving captions keeps its header and its other columns."""
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.csv").write_text("file_name,text,source\na.png,a cat,web\nb.png,a dog,camera\n",
                                           encoding="utf-8")
    assert read_captions(tmp_path) == {"a.png": "a cat", "b.png": "a dog"}
    write_captions(tmp_path, {"b.png": "a small dog"}, "csv")
    assert (tmp_path / "metadata.csv").read_text(encoding="utf-8") == (
        "file_name,text,source\na.png,a cat,web\nb.png,a small dog,camera\n")
    _images(tmp_path, ["c.png"])
    write_captions(tmp_path, {"c.png": "a bird"}, "csv")
    assert read_metadata_csv(tmp_path / "metadata.csv") == {"a.png": "a cat", "b.png": "a small dog", "c.png": "a bird"}
    assert (tmp_path / "metadata.csv").read_text(encoding="utf-8").endswith("c.png,a bird,\n")
