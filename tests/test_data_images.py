"""open_image_rgb / probe_image: every mode to the right RGB pixels, files untouched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_trainer.data.images import open_image_and_alpha, open_image_rgb, probe_image, to_rgb
from lora_trainer.errors import DatasetError


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in img.getpixel(xy))


@pytest.mark.parametrize("ext,fmt,lossy", [(".png", "PNG", False), (".bmp", "BMP", False),
                                           (".jpg", "JPEG", True), (".webp", "WEBP", True)])
def test_rgb_formats_round_trip(tmp_path: Path, ext: str, fmt: str, lossy: bool) -> None:
    src = Image.new("RGB", (96, 64), (200, 30, 60))
    src.paste((20, 180, 90), (48, 0, 96, 64))
    path = _save(src, tmp_path / f"x{ext}", format=fmt, **({"quality": 95} if lossy else {}))
    out = open_image_rgb(path)
    assert out.mode == "RGB" and out.size == (96, 64)
    tol = 8 if lossy else 0
    assert np.abs(np.asarray(out, dtype=int)[10, 10] - (200, 30, 60)).max() <= tol
    assert np.abs(np.asarray(out, dtype=int)[10, 80] - (20, 180, 90)).max() <= tol


def test_rgba_transparent_is_white_and_partial_alpha_blends(tmp_path: Path) -> None:
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 0), (255, 0, 0, 128))
    out = open_image_rgb(_save(img, tmp_path / "a.png"))
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (255, 0, 0)
    r, g, b = _px(out, (2, 0))
    assert r == 255 and 125 <= g <= 129 and g == b


def test_la_and_palette_transparency_on_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    out = open_image_rgb(_save(la, tmp_path / "la.png"))
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (40, 40, 40)

    p = Image.new("P", (2, 1), 0)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = open_image_rgb(_save(p, tmp_path / "p.png", transparency=0))
    assert _px(out, (0, 0)) == (255, 255, 255) and _px(out, (1, 0)) == (10, 200, 30)


def test_palette_without_transparency_and_greyscale(tmp_path: Path) -> None:
    p = Image.new("P", (1, 1), 0)
    p.putpalette([90, 10, 250] + [0] * 765)
    assert _px(open_image_rgb(_save(p, tmp_path / "p.bmp")), (0, 0)) == (90, 10, 250)
    grey = Image.new("L", (1, 1), 77)
    assert _px(open_image_rgb(_save(grey, tmp_path / "g.png")), (0, 0)) == (77, 77, 77)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = open_image_rgb(path)
    assert [_px(out, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_int32_and_float_modes() -> None:
    i32 = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    assert [to_rgb(i32).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    small = Image.fromarray(np.array([[0, 200]], dtype=np.int32), mode="I")  # already 8-bit range
    assert to_rgb(small).getpixel((1, 0)) == (200, 200, 200)
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert [to_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 8), (0, 0, 0, 0))  # no ink: white
    img.paste((0, 255, 255, 0), (8, 0, 16, 8))  # magenta + yellow: red
    out = open_image_rgb(_save(img, tmp_path / "c.jpg", quality=95))
    assert out.mode == "RGB"
    assert min(_px(out, (2, 4))) >= 245
    r, g, b = _px(out, (12, 4))
    assert r >= 240 and g <= 15 and b <= 15


def test_exif_orientation_6_rotates_clockwise(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = open_image_rgb(path)
    assert out.size == (20, 40)
    top, bottom = _px(out, (10, 5)), _px(out, (10, 35))
    assert top[0] > 200 and top[2] < 50  # the stored left (red) edge is now on top
    assert bottom[2] > 200 and bottom[0] < 50
    probe = probe_image(path)
    assert (probe.width, probe.height, probe.format) == (20, 40, "JPEG")


def test_large_image_opens(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (4000, 3000), (1, 2, 3)), tmp_path / "big.jpg")
    assert probe_image(path).width == 4000
    assert open_image_rgb(path).size == (4000, 3000)


def test_opening_never_modifies_the_file(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    path = _save(Image.new("RGBA", (30, 10), (5, 6, 7, 100)), tmp_path / "keep.png", exif=exif.tobytes())
    before, mtime = path.read_bytes(), path.stat().st_mtime_ns
    open_image_rgb(path)
    probe_image(path)
    open_image_rgb(path, data=path.read_bytes())
    assert path.read_bytes() == before and path.stat().st_mtime_ns == mtime


def _truncated(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((200, 150), 60).convert("RGB").save(buf, format=fmt)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("name,data", [
    ("empty.png", b""),
    ("text.jpg", b"this is not an image at all\n"),
    ("cut.png", _truncated("PNG")),
    ("cut.jpg", _truncated("JPEG")),
    ("cut.bmp", _truncated("BMP")),
    ("cut.webp", _truncated("WEBP")),
])
def test_unreadable_files_raise_dataset_error_naming_the_file(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    for fn in (open_image_rgb, probe_image):
        with pytest.raises(DatasetError) as err:
            fn(path)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        open_image_rgb(tmp_path / "nope.png")


def test_min_size_decodes_large_jpegs_smaller_but_never_below(tmp_path: Path) -> None:
    src = Image.new("RGB", (2000, 1000), (200, 10, 10))
    src.paste((10, 10, 200), (1000, 0, 2000, 1000))
    path = _save(src, tmp_path / "big.jpg", quality=92)
    out = open_image_rgb(path, min_size=(256, 128))
    assert out.size == (500, 250)  # 1/4 scale is the smallest that still covers 256x128
    assert out.getpixel((100, 125))[0] > 180 and out.getpixel((400, 125))[2] > 180
    assert open_image_rgb(path, min_size=(1500, 100)).size == (2000, 1000)
    # an EXIF-rotated JPEG: min_size is in upright pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = _save(src, tmp_path / "rot.jpg", exif=exif.tobytes())
    out = open_image_rgb(rot, min_size=(128, 256))
    assert out.size == (250, 500)
    png = _save(src, tmp_path / "big.png")
    assert open_image_rgb(png, min_size=(256, 128)).size == (2000, 1000)  # only JPEG has draft mode


def test_jpeg_with_appended_data_is_fine_and_cut_jpeg_is_not(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((200, 150), 60).convert("RGB").save(buf, format="JPEG")
    whole = buf.getvalue()
    assert whole.endswith(b"\xff\xd9")
    extra = tmp_path / "extra.jpg"
    extra.write_bytes(whole + b"appended video or junk" * 100)  # as some phones write
    assert probe_image(extra).width == 200
    assert probe_image(tmp_path / "x.jpg", data=whole).height == 150
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole[:-200])
    with pytest.raises(DatasetError, match="cut.jpg"):
        probe_image(cut)


def test_truncation_found_even_when_the_host_allows_truncated_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some host applications do
    noise = Image.effect_noise((101, 77), 60)
    valid = {
        "rgb.bmp": (noise.convert("RGB"), {}), "grey.bmp": (noise, {}), "pal.bmp": (noise.convert("P"), {}),
        "bits.bmp": (noise.convert("1"), {}), "prog.jpg": (noise.convert("RGB"), {"progressive": True}),
        "plain.jpg": (noise.convert("RGB"), {}), "x.png": (noise, {}), "x.webp": (noise.convert("RGB"), {}),
    }
    for name, (img, kw) in valid.items():
        path = _save(img, tmp_path / name, **kw)
        assert probe_image(path).width == 101, name
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
        with pytest.raises(DatasetError, match=f"cut_{name}"):
            probe_image(cut)
    extra = tmp_path / "extra.jpg"
    extra.write_bytes((tmp_path / "plain.jpg").read_bytes() + b"\x00appended" * 50)
    assert probe_image(extra).height == 77


def test_alpha_comes_beside_the_image_on_white_and_none_without_transparency(tmp_path: Path) -> None:
    """alpha_mask's source: the alpha band (also of a palette's transparent colour) at the upright
    size, with the same RGB image open_image_rgb gives; an opaque file has none."""
    img = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))
    img.putpixel((2, 1), (0, 0, 255, 100))
    path = _save(img, tmp_path / "a.png")
    rgb, alpha = open_image_and_alpha(path)
    assert np.array_equal(np.asarray(rgb), np.asarray(open_image_rgb(path)))
    assert alpha is not None and alpha.mode == "L" and alpha.size == (4, 2)
    assert np.asarray(alpha).tolist() == [[0, 255, 0, 0], [0, 0, 100, 0]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 255, 255, 255])
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    _, pal_alpha = open_image_and_alpha(_save(pal, tmp_path / "p.png", transparency=0))
    assert pal_alpha is not None and np.asarray(pal_alpha).tolist() == [[0, 255]]
    opaque = _save(Image.new("RGB", (3, 3), (9, 9, 9)), tmp_path / "o.png")
    assert open_image_and_alpha(opaque)[1] is None


def test_color_augmentation_is_kohyas_recipe_drawn_from_the_rng() -> None:
    """kohya's draws: a third of the uses change the image; of those, half shift the hue by the
    drawn angle (at most 16 degrees; brightness and saturation kept), half apply the drawn gamma
    (0.95-1.05) to values in 0-1. The same draws give the same image."""
    import colorsys
    import random

    from lora_trainer.data.images import color_augment

    rgb = (200, 80, 40)
    img = Image.new("RGB", (8, 8), rgb)
    h0, s0, v0 = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    kinds = {"same": 0, "hue": 0, "gamma": 0}
    for seed in range(600):
        out = color_augment(img, random.Random(seed))
        assert out.size == img.size and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(color_augment(img, random.Random(seed))))
        px = out.getpixel((3, 3))
        draws = random.Random(seed)
        if draws.random() > 0.33:
            kinds["same"] += 1
            assert px == rgb
        elif draws.random() > 0.5:
            kinds["hue"] += 1
            shift = draws.uniform(-16, 16)
            h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in px))
            assert abs((h - h0) * 360 - shift + 180) % 360 - 180 == pytest.approx(0, abs=2.5)  # 8-bit hue steps
            assert abs(v - v0) <= 2 / 255 and abs(s - s0) < 0.03
        else:
            kinds["gamma"] += 1
            gamma = draws.uniform(0.95, 1.05)
            assert px == tuple(round(255 * (c / 255) ** gamma) for c in rgb)
    assert 0.6 < kinds["same"] / 600 < 0.74 and kinds["hue"] > 60 and kinds["gamma"] > 60
