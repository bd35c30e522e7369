"""Open training images as RGB, whatever their mode, and probe them cheaply for the scanner.

Pillow does the decoding; what it does not do on its own is turn every mode a user's folder can
hold into the 8-bit RGB the VAE expects: transparency is composited on white (not dropped, which
turns transparent areas black or into stray colours), 16-bit greyscale is scaled (Pillow's own
conversion clips it), CMYK goes through its ICC profile when it has one, and the EXIF orientation
is applied. Files are only ever read.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_trainer.errors import DatasetError

# EXIF orientations 5-8 rotate by 90 degrees: width and height swap once applied.
_ROTATING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
# Errors Pillow raises for files it cannot read (truncated data, bad chunks, not an image).
_READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageProbe:
    """What the scanner needs to know about an image without keeping its pixels."""

    width: int  # after the EXIF orientation is applied
    height: int
    format: str
    mode: str


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read (wrong extension or damaged header)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({exc}); downscale it"
    text = str(exc).strip() or type(exc).__name__
    return f"damaged or truncated ({text})"


def _open_source(path: Path, data: bytes | None) -> Image.Image:
    with warnings.catch_warnings():
        # Large photos trip Pillow's decompression-bomb *warning*; the hard limit still raises.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data) if data is not None else path)


def _alpha_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float greyscale to 8 bits (Pillow's convert() would clip)."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
    elif im.mode.startswith("I;16"):
        arr = arr.astype(np.float64) / 257.0
    else:  # "I": 32-bit ints; PNG/TIFF 16-bit data often lands here with values up to 65535
        arr = arr.astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if peak > 255.0:
            arr = arr / (257.0 if peak <= 65535.0 else peak / 255.0)
    grey = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    profile = im.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile falls back to Pillow's plain formula
            pass
    return im.convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (transparency on white)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        return _alpha_on_white(im)
    if mode in ("L", "RGBX") and "transparency" in im.info:
        return _alpha_on_white(im)
    if mode == "I" or mode == "F" or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    return im.convert("RGB")


def open_image_rgb(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Decode ``path`` (or its already-read bytes ``data``) to an EXIF-rotated 8-bit RGB image.

    Raises DatasetError naming the file when it cannot be read. The file is not modified.
    """
    path = Path(path)
    try:
        with _open_source(path, data) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            rgb = to_rgb(upright)
            # Detach from the file: the result must outlive the ``with`` block.
            return rgb.copy() if rgb is im else rgb
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except PermissionError:
        raise DatasetError(f"{path}: permission denied; make the file readable") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: {_describe(e)}; re-export it or remove it from the folder") from None


def probe_image(path: str | Path, data: bytes | None = None) -> ImageProbe:
    """Size (after EXIF orientation), format and mode, checking that the pixel data is intact.

    Much cheaper than a full decode: PNG is checked chunk by chunk (CRCs, truncation) by
    ``verify()``; JPEG is decoded at 1/8 scale via ``draft()`` (the whole entropy-coded stream
    is still read, so truncation is caught); other formats are small or fast to decode.
    """
    path = Path(path)
    try:
        with _open_source(path, data) as im:
            width, height = im.size
            fmt, mode = im.format or "?", im.mode
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
            except Exception:  # noqa: BLE001 - unreadable EXIF just means no rotation
                orientation = 1
            if fmt != "PNG":
                if fmt == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
        if fmt == "PNG":
            # verify() must come right after open, and reading EXIF may already have read chunks.
            with _open_source(path, data) as again:
                again.verify()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except PermissionError:
        raise DatasetError(f"{path}: permission denied") from None
    except _READ_ERRORS as e:
        raise DatasetError(f"{path}: {_describe(e)}") from None
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return ImageProbe(width=width, height=height, format=fmt, mode=mode)
