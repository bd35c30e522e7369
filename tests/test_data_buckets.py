"""Aspect-ratio buckets: the table, assignment, no-upscale, square mode, fitting and cropping."""

from __future__ import annotations

import math
import random

import pytest
from PIL import Image

from lora_trainer.config import DataConfig
from lora_trainer.data.buckets import assign_bucket, bucket_resolutions, fit_to_bucket
from lora_trainer.errors import ConfigError


def _log_ar(w: float, h: float) -> float:
    return math.log(w / h)


@pytest.mark.parametrize("res,lo,hi,step", [(512, 256, 1024, 64), (768, 256, 1024, 64),
                                            (1024, 512, 2048, 64), (512, 256, 1024, 32)])
def test_bucket_table_invariants(res: int, lo: int, hi: int, step: int) -> None:
    table = bucket_resolutions(res, lo, hi, step)
    assert (res // step * step,) * 2 in table
    assert len(table) == len(set(table)) > 5
    for w, h in table:
        assert w % step == 0 and h % step == 0
        assert w * h <= res * res
        assert lo <= w <= hi and lo <= h <= hi
        assert (h, w) in table  # every landscape bucket has its portrait twin
    # no bucket wastes area: one more step on its short side would break the area budget, unless
    # the long side is capped at max_reso (those buckets exist for their extreme aspect ratios)
    for w, h in table:
        assert (min(w, h) + step) * max(w, h) > res * res or max(w, h) == hi


def test_small_resolution_still_has_its_square() -> None:
    assert bucket_resolutions(128, 256, 1024, 64) == [(128, 128)]


@pytest.mark.parametrize("size,bucket", [
    ((1024, 512), (704, 320)),
    ((512, 1024), (320, 704)),
    ((512, 512), (512, 512)),
    ((2000, 2000), (512, 512)),
    ((3000, 2000), (640, 384)),
    ((2000, 3000), (384, 640)),
    ((1920, 1080), (640, 384)),
    ((100, 1000), (256, 1024)),
    ((4000, 1000), (1024, 256)),
])
def test_assignment_table_at_512(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert assign_bucket(*size, DataConfig(resolution=512)) == bucket


@pytest.mark.parametrize("size", [(1024, 512), (640, 480), (480, 640), (1234, 567), (300, 1700), (999, 1000)])
def test_assigned_bucket_has_the_closest_aspect(size: tuple[int, int]) -> None:
    cfg = DataConfig(resolution=512)
    w, h = assign_bucket(*size, cfg)
    assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512
    best = min(abs(_log_ar(*b) - _log_ar(*size)) for b in bucket_resolutions(512, 256, 1024, 64))
    assert abs(_log_ar(w, h) - _log_ar(*size)) == pytest.approx(best)


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (500, 130), (1024, 512), (4000, 3000), (70, 70)])
def test_no_upscale_never_exceeds_the_image(size: tuple[int, int]) -> None:
    cfg = DataConfig(resolution=512, bucket_no_upscale=True)
    w, h = assign_bucket(*size, cfg)
    assert w % 64 == 0 and h % 64 == 0
    assert w <= size[0] or w == 64
    assert h <= size[1] or h == 64
    assert w * h <= 512 * 512


def test_no_upscale_small_and_large() -> None:
    cfg = DataConfig(resolution=512, bucket_no_upscale=True)
    assert assign_bucket(300, 200, cfg) == (256, 192)  # smaller than the usual 512-area bucket
    assert assign_bucket(512, 512, cfg) == (512, 512)
    w, h = assign_bucket(2048, 1024, cfg)  # large images still shrink to the area budget
    assert (w, h) == (704, 320)


def test_square_mode() -> None:
    cfg = DataConfig(resolution=512, enable_buckets=False)
    assert assign_bucket(1024, 512, cfg) == (512, 512)
    assert assign_bucket(200, 300, cfg) == (512, 512)  # upscaled by default
    no_up = DataConfig(resolution=512, enable_buckets=False, bucket_no_upscale=True)
    assert assign_bucket(200, 300, no_up) == (192, 192)
    assert assign_bucket(1024, 600, no_up) == (512, 512)


def _halves(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (255, 0, 0))
    img.paste((0, 0, 255), (w // 2, 0, w, h))
    return img


def test_fit_center_crop_and_offsets() -> None:
    img = _halves(400, 200)  # 2:1 into a square: cover -> 256x128, then crop the width
    out, (top, left) = fit_to_bucket(img, (128, 128), "center")
    assert out.size == (128, 128)
    assert (top, left) == (0, 64)  # resized to 256x128, centred crop drops 64 px each side
    assert out.getpixel((10, 64))[0] > 200 and out.getpixel((120, 64))[2] > 200


def test_fit_covers_the_bucket_when_upscaling() -> None:
    out, (top, left) = fit_to_bucket(_halves(50, 100), (128, 192), "center")
    assert out.size == (128, 192)  # 50x100 -> 128x256 -> crop 32 rows top and bottom
    assert (top, left) == (32, 0)


def test_fit_exact_size_is_untouched() -> None:
    img = _halves(128, 64)
    out, crop = fit_to_bucket(img, (128, 64), "center")
    assert crop == (0, 0) and out.tobytes() == img.tobytes()


def test_random_crop_is_seeded() -> None:
    img = _halves(512, 128)
    a = [fit_to_bucket(img, (128, 128), "random", random.Random(s))[1] for s in range(8)]
    b = [fit_to_bucket(img, (128, 128), "random", random.Random(s))[1] for s in range(8)]
    assert a == b
    assert len(set(a)) > 1
    assert all(top == 0 and 0 <= left <= 384 for top, left in a)
    out, (_, left) = fit_to_bucket(img, (128, 128), "random", random.Random(3))
    assert out.size == (128, 128)
    expect_red = left + 64 < 256  # the crop's middle column lies in the red half
    assert (out.getpixel((64, 64))[0] > 200) == expect_red


def test_bad_crop_mode() -> None:
    with pytest.raises(ConfigError, match="data.crop"):
        fit_to_bucket(_halves(64, 64), (64, 64), "left")
