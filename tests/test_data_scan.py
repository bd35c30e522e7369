"""scan_dataset: layouts, repeats, captions, every validation problem, skip vs stop, read-only."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.config import DataConfig
from lora_trainer.data.scan import build_report, scan_dataset
from lora_trainer.errors import DatasetError


def _img(path: Path, size: tuple[int, int] = (96, 80), colour: tuple[int, int, int] = (10, 20, 30),
         fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _caption(path: Path, text: str) -> None:
    path.with_suffix(".txt").write_text(text, encoding="utf-8")


def _cfg(folder: Path, **kw) -> DataConfig:
    return DataConfig(train_data_dir=str(folder), **kw)


def _kinds(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in report.problems:
        out.setdefault(p.kind, []).append(p.path.name)
    return out


@pytest.fixture
def good(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        p = _img(folder / f"img{i}.png", (128 + 64 * i, 128), colour)
        _caption(p, f"caption {i}")
    return folder


def test_clean_sidecar_dataset(good: Path) -> None:
    r = scan_dataset(_cfg(good))
    assert r.problems == []
    assert [(i.rel, i.caption, i.width, i.height, i.repeats, i.is_reg) for i in r.items] == [
        ("img0.png", "caption 0", 128, 128, 1, False),
        ("img1.png", "caption 1", 192, 128, 1, False),
        ("img2.png", "caption 2", 256, 128, 1, False),
    ]
    assert all(len(i.digest) == 64 for i in r.items)
    assert len({i.digest for i in r.items}) == 3


def test_metadata_csv_layout(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg", colour=(1, 1, 1))
    _img(tmp_path / "b.webp", colour=(2, 2, 2))
    (tmp_path / "metadata.csv").write_text('filename,prompt\na.jpg,"x, y"\nb.webp,z\n', encoding="utf-8")
    r = scan_dataset(_cfg(tmp_path))
    assert {i.rel: i.caption for i in r.items} == {"a.jpg": "x, y", "b.webp": "z"}


def test_explicit_metadata_path_elsewhere(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "a.png")
    csv = tmp_path / "caps.csv"
    csv.write_text("filename,prompt\nimgs/a.png,hello\n", encoding="utf-8")
    r = scan_dataset(_cfg(tmp_path / "imgs", metadata_path=str(csv)))
    assert [(i.rel, i.caption) for i in r.items] == [("a.png", "hello")]


def test_kohya_folders_set_repeats_and_class_captions(tmp_path: Path) -> None:
    _caption(_img(tmp_path / "10_sks dog" / "a.png", colour=(1, 0, 0)), "sks dog running")
    _img(tmp_path / "10_sks dog" / "b.png", colour=(2, 0, 0))  # no caption: the folder's class part
    _caption(_img(tmp_path / "3_style" / "deep" / "c.png", colour=(3, 0, 0)), "c")
    _caption(_img(tmp_path / "plain" / "d.png", colour=(4, 0, 0)), "d")
    _caption(_img(tmp_path / "e.png", colour=(5, 0, 0)), "e")
    r = scan_dataset(_cfg(tmp_path, repeats=2))
    got = {i.rel: (i.repeats, i.caption, i.caption_source) for i in r.items}
    assert got == {
        "10_sks dog/a.png": (10, "sks dog running", "file"),
        "10_sks dog/b.png": (10, "sks dog", "folder"),
        "3_style/deep/c.png": (3, "c", "file"),
        "plain/d.png": (2, "d", "file"),
        "e.png": (2, "e", "file"),
    }
    assert r.images_per_epoch == 10 + 10 + 3 + 2 + 2
    assert "10_sks dog: 2 image(s) x 10 repeat(s)" in r.summary()


def test_reg_images_use_folder_class_and_are_marked(tmp_path: Path) -> None:
    train, reg = tmp_path / "train", tmp_path / "reg"
    _caption(_img(train / "a.png", colour=(9, 9, 9)), "sks dog")
    _img(reg / "1_dog" / "r1.png", colour=(1, 2, 3))
    _img(reg / "cat" / "r2.png", colour=(3, 2, 1))
    _caption(_img(reg / "r3.png", colour=(4, 4, 4)), "a photo of a dog")
    _img(reg / "r4.png", colour=(5, 5, 5))  # directly in "reg" with no caption: no class to use
    r = build_report(_cfg(train, reg_data_dir=str(reg)))
    assert _kinds(r) == {"no_caption": ["r4.png"]}
    assert [i.rel for i in r.train_items] == ["a.png"]
    assert {i.rel: i.caption for i in r.reg_items} == {"1_dog/r1.png": "dog", "cat/r2.png": "cat",
                                                       "r3.png": "a photo of a dog"}
    assert all(i.is_reg for i in r.reg_items)
    assert r.images_per_epoch == 1
    assert "regularization" in r.summary()
    kohya_root = tmp_path / "5_cat"
    _img(kohya_root / "k.png", colour=(6, 6, 6))
    r = scan_dataset(_cfg(train, reg_data_dir=str(kohya_root)))
    assert [(i.caption, i.repeats) for i in r.reg_items] == [("cat", 1)]  # root name: class, not repeats


def test_trigger_word_makes_uncaptioned_images_usable(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    assert _kinds(build_report(_cfg(tmp_path))) == {"no_caption": ["a.png"]}
    r = scan_dataset(_cfg(tmp_path, trigger_word="sks"))
    assert [(i.caption, i.caption_source) for i in r.items] == [("", "none")]


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((160, 120), 40).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def test_every_problem_kind_is_reported_and_skipped(good: Path) -> None:
    (good / "zero.png").write_bytes(b"")
    (good / "notimage.jpg").write_bytes(b"GIF89a? no, just text")
    (good / "truncated.jpg").write_bytes(_jpeg_bytes()[:900])
    _caption(good / "zero.png", "z")
    _caption(good / "notimage.jpg", "n")
    _caption(good / "truncated.jpg", "t")
    _caption(_img(good / "tiny.png", (40, 200), (7, 7, 7)), "tiny")
    _img(good / "uncaptioned.png", colour=(8, 8, 8))
    _caption(good / "ghost.png", "caption of a deleted image")
    (good / "zcopy.png").write_bytes((good / "img1.png").read_bytes())
    _caption(good / "zcopy.png", "copy")
    r = build_report(_cfg(good))
    assert _kinds(r) == {
        "orphan_caption": ["ghost.txt"],
        "corrupt": ["notimage.jpg", "truncated.jpg", "zero.png"],
        "duplicate": ["zcopy.png"],
        "too_small": ["tiny.png"],
        "no_caption": ["uncaptioned.png"],
    }
    dup = next(p for p in r.problems if p.kind == "duplicate")
    assert "img1.png" in dup.message
    assert "empty file" in next(p.message for p in r.problems if p.path.name == "zero.png")
    assert [i.rel for i in r.items] == ["img0.png", "img1.png", "img2.png"]
    assert r.images_found == 9
    scan_dataset(_cfg(good))  # skip (the default): trains on the rest
    summary = r.summary()
    for kind in ("corrupt 3", "duplicate 1", "too_small 1", "no_caption 1", "orphan_caption 1"):
        assert kind in summary


def test_duplicate_keeps_the_first_in_sorted_order(tmp_path: Path) -> None:
    for name in ("b.png", "a.png", "c.png"):
        _caption(_img(tmp_path / name, colour=(5, 5, 5)), name)
    r = build_report(_cfg(tmp_path))
    assert [i.rel for i in r.items] == ["a.png"]
    assert _kinds(r) == {"duplicate": ["b.png", "c.png"]}


def test_orphan_row_in_metadata_csv(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("filename,prompt\na.png,ok\nmissing.png,gone\n", encoding="utf-8")
    r = build_report(_cfg(tmp_path))
    (problem,) = r.problems
    assert problem.kind == "orphan_caption" and problem.path.name == "metadata.csv"
    assert "missing.png" in problem.message


def test_on_invalid_stop_raises_listing_the_files(good: Path) -> None:
    (good / "zero.png").write_bytes(b"")
    _img(good / "uncaptioned.png", colour=(8, 8, 8))
    with pytest.raises(DatasetError) as err:
        scan_dataset(_cfg(good, on_invalid="stop"))
    msg = str(err.value)
    assert "2 invalid" in msg and "zero.png (corrupt)" in msg and "uncaptioned.png (no_caption)" in msg
    assert "on_invalid" in msg and "\n" not in msg
    scan_dataset(_cfg(good, on_invalid="skip"))


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images .* in .*empty"):
        scan_dataset(_cfg(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(_cfg(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="train_data_dir is empty"):
        scan_dataset(DataConfig())
    _img(tmp_path / "ok" / "a.png")
    with pytest.raises(DatasetError, match="reg_data_dir"):
        scan_dataset(_cfg(tmp_path / "ok", trigger_word="x", reg_data_dir=str(tmp_path / "empty")))


def test_nothing_usable_names_the_folder_and_counts(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    _img(tmp_path / "b.png", (10, 10))
    with pytest.raises(DatasetError) as err:
        scan_dataset(_cfg(tmp_path, trigger_word="x"))
    msg = str(err.value)
    assert str(tmp_path) in msg and "1 corrupt, replace or re-save them" in msg
    assert "1 too small, use larger images or lower data.min_image_size" in msg and "\n" not in msg


def test_nothing_captioned_says_how_to_caption(tmp_path: Path) -> None:
    """A folder of images without captions: the error says what to do (caption them, or a
    trigger word as their caption), not only that they cannot be used."""
    for i in range(3):
        _img(tmp_path / f"{i}.png", colour=(i, i, i))
    with pytest.raises(DatasetError) as err:
        scan_dataset(_cfg(tmp_path))
    msg = str(err.value)
    assert "none of the 3 images" in msg and "3 no caption, caption them" in msg and "data.trigger_word" in msg
    assert len(scan_dataset(_cfg(tmp_path, trigger_word="sks")).items) == 3  # what it offers works


def test_hidden_folders_are_ignored(good: Path) -> None:
    (good / ".backup").mkdir()
    (good / ".backup" / "old.txt").write_text("x", encoding="utf-8")
    _img(good / ".cache" / "latent.png")
    r = build_report(_cfg(good))
    assert r.problems == [] and len(r.items) == 3


def test_exif_rotated_size_is_reported_upright(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "r.jpg"
    Image.new("RGB", (300, 100)).save(p, exif=exif.tobytes())
    _caption(p, "rotated")
    (item,) = scan_dataset(_cfg(tmp_path)).items
    assert (item.width, item.height) == (100, 300)


def test_scan_is_read_only(good: Path) -> None:
    (good / "zero.png").write_bytes(b"")
    (good / "metadata.csv").write_text("filename,prompt\nimg0.png,x\nnope.png,y\n", encoding="utf-8")

    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(good.rglob("*")) if p.is_file()}

    before = snapshot()
    scan_dataset(_cfg(good))
    assert snapshot() == before
    assert sorted(os.listdir(good)) == sorted(Path(k).name for k in before)


def test_buckets_in_report(tmp_path: Path) -> None:
    for i, size in enumerate([(1024, 512), (1100, 520), (512, 512), (512, 1024)]):
        _caption(_img(tmp_path / f"{i}.png", size, (i, i, i)), "x")
    r = scan_dataset(_cfg(tmp_path, resolution=512))
    assert r.bucket_counts() == {(320, 704): 1, (512, 512): 1, (704, 320): 2}
    assert "704x320: 2" in r.summary()
    d = r.to_dict()
    assert d["usable_images"] == 4 and {"width": 704, "height": 320, "count": 2} in d["buckets"]


def test_long_problem_lists_are_capped_in_the_summary(tmp_path: Path) -> None:
    _caption(_img(tmp_path / "ok.png"), "ok")
    for i in range(60):
        (tmp_path / f"bad{i:02d}.png").write_bytes(b"")
    r = build_report(_cfg(tmp_path))
    assert len(r.problems) == 60
    assert "and 20 more" in r.summary() and "bad39.png" in r.summary() and "bad40.png" not in r.summary()


def test_many_images_scan(tmp_path: Path) -> None:
    # 200 images of different sizes and formats: all found, none flagged
    for i in range(200):
        fmt = ("PNG", "JPEG", "WEBP", "BMP")[i % 4]
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp"}[fmt]
        _caption(_img(tmp_path / f"{i:03d}.{ext}", (64 + i, 64 + (i * 7) % 90), (i, 255 - i, i // 2), fmt), f"c{i}")
    r = scan_dataset(_cfg(tmp_path))
    assert len(r.items) == 200 and r.problems == []


def test_custom_caption_extension(tmp_path: Path) -> None:
    _img(tmp_path / "a.png", colour=(1, 1, 1))
    (tmp_path / "a.caption").write_text("from .caption", encoding="utf-8")
    (tmp_path / "a.txt").write_text("ignored", encoding="utf-8")
    (tmp_path / "lost.caption").write_text("orphan", encoding="utf-8")
    r = build_report(_cfg(tmp_path, caption_extension=".caption"))
    assert [i.caption for i in r.items] == ["from .caption"]
    assert _kinds(r) == {"orphan_caption": ["lost.caption"]}  # other extensions are not captions here


def test_the_summary_names_images_enlarged_to_fill_their_bucket(tmp_path: Path) -> None:
    """Images well below their bucket train on blurred detail: the summary (prepare, and the
    run's log) counts them with the largest factor and says what to do; not when images are
    large enough, nor with bucket_no_upscale."""
    for i in range(3):
        _caption(_img(tmp_path / f"small{i}.png", (200, 300), colour=(10, 20 + 40 * i, 30)), "a thing")
    _caption(_img(tmp_path / "big.png", (1200, 800)), "a thing")
    summary = scan_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=512)).summary()
    assert ("  note: 3 image(s) are smaller than their bucket and are enlarged (up to 2.1x), which trains on "
            "blurred detail; use larger images, a lower data.resolution, or data.bucket_no_upscale: true"
            ) in summary.splitlines()
    kept = scan_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=512, bucket_no_upscale=True)).summary()
    small = scan_dataset(DataConfig(train_data_dir=str(tmp_path), resolution=256, min_bucket_reso=128)).summary()
    assert "enlarged" not in kept and "enlarged" not in small
