"""Captioning a folder: rows per image, trigger/prefix/suffix, modes, backups, round trips, CLI."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.caption.blip import BlipOptions, FunctionCaptioner, load_blip
from lora_trainer.caption.clip import TERM_LISTS, ClipOptions, load_clip, load_term_list
from lora_trainer.caption.run import caption_folder, compose_caption, edit_captions
from lora_trainer.caption.tags import add_trigger
from lora_trainer.data.captions import read_captions, read_metadata_csv, read_sidecar
from lora_trainer.errors import ConfigError, DatasetError
from tests.caption_models import make_images, save_tiny_blip, save_tiny_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"blip": save_tiny_blip(root / "blip"), "clip": save_tiny_clip(root / "clip")}


@pytest.fixture(scope="module")
def blip(models: dict[str, Path]):
    return load_blip(BlipOptions(model=str(models["blip"]), device="cpu", num_beams=2, min_length=3, max_length=8))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.suffix in (".png", ".jpg")}


class Numbered:
    """Captioner that returns a known caption per image size and counts its calls."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.batches.append(len(images))
        return [f"picture {img.width}" for img in images]


def test_blip_batch_writes_one_row_per_image(tmp_path: Path, blip) -> None:
    make_images(tmp_path, 5)
    before = _digests(tmp_path)
    report = caption_folder(tmp_path, model="blip", fmt="csv", batch_size=2, captioner=blip)
    rows = read_metadata_csv(tmp_path / "metadata.csv")
    assert sorted(rows) == sorted(p.name for p in tmp_path.glob("img_*"))
    assert rows == report.captions
    assert all(text.strip() for text in rows.values())
    assert _digests(tmp_path) == before  # images untouched
    assert not list(tmp_path.glob("*.txt"))


def test_batches_progress_and_trigger_prefix_suffix(tmp_path: Path) -> None:
    make_images(tmp_path, 5)
    cap, seen = Numbered(), []
    report = caption_folder(tmp_path, fmt="txt", trigger="sks", prefix="photo of,", suffix="high quality",
                            batch_size=2, captioner=cap, progress=lambda d, t, f: seen.append((d, t)))
    assert cap.batches == [2, 2, 1]
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert read_sidecar(tmp_path / "img_0.png") == "sks, photo of, picture 40, high quality"
    assert report.captions["img_3.jpg"] == "sks, photo of, picture 64, high quality"
    assert compose_caption("sks, a cat", trigger="sks") == "sks, a cat"  # trigger only once


def test_three_modes_and_backups(tmp_path: Path) -> None:
    make_images(tmp_path, 3)
    csv = tmp_path / "metadata.csv"
    csv.write_text('filename,prompt\nimg_0.png,"hand written, keep me"\nimg_1.jpg,old caption\n', encoding="utf-8")
    original = csv.read_text(encoding="utf-8")

    skip = caption_folder(tmp_path, mode="skip-existing", captioner=Numbered())
    assert sorted(skip.skipped) == ["img_0.png", "img_1.jpg"] and list(skip.captions) == ["img_2.png"]
    rows = read_metadata_csv(csv)
    assert rows["img_0.png"] == "hand written, keep me" and rows["img_2.png"] == "picture 56"
    assert len(skip.backups) == 1 and skip.backups[0].read_text(encoding="utf-8") == original

    appended = caption_folder(tmp_path, mode="append", captioner=Numbered(), trigger="sks")
    assert read_metadata_csv(appended.backups[0]) == {**read_metadata_csv(skip.backups[0]), "img_2.png": "picture 56"}
    rows = read_metadata_csv(csv)
    assert rows["img_0.png"] == "sks, hand written, keep me, picture 40"
    assert rows["img_2.png"] == "sks, picture 56, picture 56"

    overwritten = caption_folder(tmp_path, mode="overwrite", captioner=Numbered())
    assert read_metadata_csv(csv) == {"img_0.png": "picture 40", "img_1.jpg": "picture 48", "img_2.png": "picture 56"}
    assert read_metadata_csv(overwritten.backups[0]) == rows
    backups = set((tmp_path / ".backup").glob("metadata.csv.*.bak"))
    assert backups == {skip.backups[0], appended.backups[0], overwritten.backups[0]}  # one per run


def test_sidecar_backups_and_skip_reads_the_sidecars(tmp_path: Path) -> None:
    make_images(tmp_path, 2)
    (tmp_path / "img_0.txt").write_text("mine", encoding="utf-8")
    report = caption_folder(tmp_path, fmt="txt", mode="skip-existing", captioner=Numbered())
    assert report.skipped == ["img_0.png"] and not report.backups
    report = caption_folder(tmp_path, fmt="txt", mode="overwrite", captioner=Numbered())
    assert read_sidecar(tmp_path / "img_0.png") == "picture 40"
    assert [b.read_text(encoding="utf-8") for b in report.backups if b.name.startswith("img_0")] == ["mine"]


TRICKY = ['a "quoted" cat, on a sofa', "line one\nline two, 逗号", "猫在沙发上，红色", "comma, at end"]


def test_tricky_captions_survive_write_read(tmp_path: Path) -> None:
    make_images(tmp_path, 4)
    texts = iter(TRICKY)
    cap = FunctionCaptioner(lambda img: next(texts))
    report = caption_folder(tmp_path, fmt="both", batch_size=3, captioner=cap)
    assert sorted(report.captions.values()) == sorted(TRICKY)
    from_csv = read_metadata_csv(tmp_path / "metadata.csv")
    assert from_csv == report.captions
    for rel, text in report.captions.items():
        assert read_sidecar(tmp_path / rel) == text
    assert read_captions(tmp_path) == report.captions


def test_unreadable_image_listed_and_skipped(tmp_path: Path) -> None:
    make_images(tmp_path, 2)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg at all")
    (tmp_path / "empty.png").write_bytes(b"")
    report = caption_folder(tmp_path, captioner=Numbered())
    assert sorted(rel for rel, _ in report.unreadable) == ["broken.jpg", "empty.png"]
    assert sorted(read_metadata_csv(tmp_path / "metadata.csv")) == ["img_0.png", "img_1.jpg"]
    assert "broken.jpg" in report.summary()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    make_images(tmp_path, 3)
    (tmp_path / "img_0.txt").write_text("mine", encoding="utf-8")
    listing = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    report = caption_folder(tmp_path, fmt="both", dry_run=True, captioner=Numbered())
    assert len(report.captions) == 3 and report.dry_run and not report.backups
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == listing
    assert (tmp_path / "img_0.txt").read_text(encoding="utf-8") == "mine"


def test_clip_path_appends_terms_from_shipped_lists(tmp_path: Path, models: dict[str, Path], blip,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "data", 3)
    clip = load_clip(ClipOptions(model=str(models["clip"]), device="cpu", min_score=-1.0))
    shipped = {t for name in TERM_LISTS for t in load_term_list(name)}
    both = caption_folder(tmp_path / "data", model="both", captioner=blip, interrogator=clip, dry_run=True)
    only_blip = caption_folder(tmp_path / "data", model="blip", captioner=blip, dry_run=True)
    for rel, text in both.captions.items():
        base = only_blip.captions[rel]
        assert text.startswith(base + ", ")
        terms = text[len(base) + 2:].split(", ")
        assert len(terms) == len(TERM_LISTS) and set(terms) <= shipped
    only_clip = caption_folder(tmp_path / "data", model="clip", interrogator=clip, trigger="sks", dry_run=True)
    for text in only_clip.captions.values():
        tags = text.split(", ")
        assert tags[0] == "sks" and set(tags[1:]) <= shipped


def test_models_load_from_options(tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(tmp_path / "cache"))
    make_images(tmp_path / "data", 2)
    report = caption_folder(tmp_path / "data", model="both", fmt="txt",
                            blip=BlipOptions(model=str(models["blip"]), device="cpu", max_length=6),
                            clip=ClipOptions(model=str(models["clip"]), device="cpu", min_score=-1.0))
    assert len(report.captions) == 2 and all(read_sidecar(tmp_path / "data" / r) for r in report.captions)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--mode"):
        caption_folder(tmp_path, mode="replace", captioner=Numbered())
    with pytest.raises(ConfigError, match="--format"):
        caption_folder(tmp_path, fmt="json", captioner=Numbered())
    with pytest.raises(DatasetError, match="no images"):
        caption_folder(tmp_path, captioner=Numbered())


def test_edit_captions_writes_only_changes_with_backup(tmp_path: Path) -> None:
    make_images(tmp_path, 2)
    for i, text in enumerate(["cat, red", "dog"]):
        (tmp_path / f"img_{i}.txt").write_text(text, encoding="utf-8")
    before, after, backups = edit_captions(tmp_path, lambda c: add_trigger(c, "sks"))
    assert after == {"img_0.png": "sks, cat, red", "img_1.jpg": "sks, dog"}
    assert before["img_0.png"] == "cat, red" and len(backups) == 2
    _, _, backups = edit_captions(tmp_path, lambda c: add_trigger(c, "sks"))
    assert backups == []  # nothing changed, nothing written
