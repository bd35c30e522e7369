"""Aspect-ratio buckets (kohya-style) and fitting an image to its bucket.

Instead of cropping every image to a square, images are grouped into buckets of similar aspect
ratio whose area is at most ``resolution**2`` and whose sides are multiples of ``bucket_step``
(the VAE downsamples by 8 and the UNet by up to 8 more, so sides must divide evenly). Each batch
holds one bucket. These are small pure functions; the trainer's dataset builds batches on them.
"""

from __future__ import annotations

import functools
import math
import random

from PIL import Image

from lora_trainer.config import DataConfig
from lora_trainer.errors import ConfigError


@functools.lru_cache(maxsize=64)
def _bucket_table(resolution: int, min_reso: int, max_reso: int, step: int) -> tuple[tuple[int, int], ...]:
    max_area = resolution * resolution
    # A resolution outside [min_reso, max_reso] widens the range rather than yielding no buckets.
    lo, hi = min(min_reso, resolution), max(max_reso, resolution)
    side = max(step, (resolution // step) * step)
    found = {(side, side)}
    width = max(step, math.ceil(lo / step) * step)
    while width <= hi:
        # The tallest height (a multiple of step, within the range) that keeps the area in budget.
        height = min(hi, (max_area // width) // step * step)
        if height >= lo and height >= step:
            found.add((width, height))
            found.add((height, width))
        width += step
    return tuple(sorted(found))


def bucket_resolutions(resolution: int, min_reso: int = 256, max_reso: int = 1024,
                       step: int = 64) -> list[tuple[int, int]]:
    """All (width, height) buckets: sides multiples of ``step`` in [min_reso, max_reso], area <= resolution²."""
    if resolution < step or step < 1:
        raise ConfigError(f"data.resolution ({resolution}) must be at least data.bucket_step ({step})")
    return list(_bucket_table(resolution, min_reso, max_reso, step))


def _log_aspect(width: float, height: float) -> float:
    # Compared in log space so 2:1 and 1:2 are equally far from 1:1 (a plain w/h ratio would
    # treat landscape and portrait images differently).
    return math.log(width / height)


def closest_bucket(width: int, height: int, buckets: list[tuple[int, int]] | tuple[tuple[int, int], ...]
                   ) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (ties: the larger bucket)."""
    target = _log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(_log_aspect(*b) - target), -b[0] * b[1], b))


def _no_upscale_bucket(width: int, height: int, resolution: int, max_reso: int,
                       step: int) -> tuple[int, int]:
    """A bucket never larger than the image: shrink to the area budget, round sides down to step."""
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    scale = min(scale, max_reso / max(width, height)) if max(width, height) > max_reso else scale
    w = max(step, int(width * scale) // step * step)
    h = max(step, int(height * scale) // step * step)
    return w, h


def assign_bucket(width: int, height: int, data_cfg: DataConfig) -> tuple[int, int]:
    """(width, height) of the bucket an image of this size trains in.

    - ``enable_buckets`` False: the square ``resolution`` (with ``bucket_no_upscale``, a smaller
      square for images whose short side is below it).
    - ``bucket_no_upscale``: a bucket fitted to this image alone, never larger than it.
    - otherwise: the predefined bucket with the closest aspect ratio.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    res, step = data_cfg.resolution, data_cfg.bucket_step
    if not data_cfg.enable_buckets:
        if data_cfg.bucket_no_upscale and min(width, height) < res:
            side = max(step, min(width, height) // step * step)
            return side, side
        return res, res
    if data_cfg.bucket_no_upscale:
        return _no_upscale_bucket(width, height, res, max(data_cfg.max_bucket_reso, res), step)
    table = _bucket_table(res, data_cfg.min_bucket_reso, data_cfg.max_bucket_reso, step)
    return closest_bucket(width, height, table)


def fit_to_bucket(img: Image.Image, bucket_wh: tuple[int, int], crop: str = "center",
                  rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize ``img`` to cover the bucket (keeping its aspect ratio), then crop to the bucket.

    Returns the image and (crop_top, crop_left) in the resized image's pixels (SDXL conditions
    on them). ``crop="random"`` draws the offset from ``rng`` (seeded by the caller).
    """
    if crop not in ("center", "random"):
        raise ConfigError(f"data.crop: {crop!r} must be 'center' or 'random'")
    bw, bh = bucket_wh
    w, h = img.size
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if (rw, rh) != (w, h):
        # LANCZOS when shrinking keeps detail without aliasing; BICUBIC when enlarging avoids ringing.
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((rw, rh), method, reducing_gap=3.0 if scale < 1 else None)
    if crop == "random":
        rng = rng or random.Random()
        top, left = rng.randint(0, rh - bh), rng.randint(0, rw - bw)
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    if (rw, rh) != (bw, bh):
        img = img.crop((left, top, left + bw, top + bh))
    return img, (top, left)
