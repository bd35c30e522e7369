"""Open training images as RGB, whatever their mode, and probe them cheaply for the scanner.

Pillow does the decoding; what it does not do on its own is turn every mode a user's folder can
hold into the 8-bit RGB the VAE expects: transparency is composited on white (not dropped, which
turns transparent areas black or into stray colours), 16-bit greyscale is scaled (Pillow's own
conversion clips it), CMYK goes through its ICC profile when it has one, and the EXIF orientation
is applied. Files are only ever read.
"""

from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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


def _read_error(path: Path, exc: BaseException) -> DatasetError:
    """One line naming the file and what to do, for any error reading an image."""
    if isinstance(exc, FileNotFoundError):
        return DatasetError(f"{path}: file not found")
    if isinstance(exc, PermissionError):
        return DatasetError(f"{path}: permission denied; make the file readable")
    return DatasetError(f"{path}: {_describe(exc)}; re-export it or remove it from the folder")


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


def has_alpha(im: Image.Image) -> bool:
    """Whether ``im`` carries transparency: an alpha band, or a palette/grey transparent colour."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return im.mode in ("P", "L", "RGBX") and "transparency" in im.info


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (transparency on white)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if has_alpha(im):
        return _alpha_on_white(im)
    if mode == "I" or mode == "F" or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(im)
    if mode == "CMYK":
        return _cmyk_to_rgb(im)
    return im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF just means no rotation
        return 1


def open_image_rgb(path: str | Path, data: bytes | None = None, *,
                   min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` (or its already-read bytes ``data``) to an EXIF-rotated 8-bit RGB image.

    ``min_size`` (width, height of the upright image, e.g. its bucket) lets a large JPEG decode
    at 1/2, 1/4 or 1/8 scale while staying at least that big: much faster for photos that are
    shrunk to a bucket anyway. Raises DatasetError naming the file when it cannot be read. The
    file is not modified.
    """
    path = Path(path)
    try:
        with _open_source(path, data) as im:
            if min_size is not None and im.format == "JPEG":
                want_w, want_h = min_size
                if _orientation(im) in _ROTATING_ORIENTATIONS:
                    want_w, want_h = want_h, want_w
                im.draft(im.mode, (max(1, want_w), max(1, want_h)))
            im.load()
            upright = ImageOps.exif_transpose(im)
            rgb = to_rgb(upright)
            # Detach from the file: the result must outlive the ``with`` block.
            return rgb.copy() if rgb is im else rgb
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None


def open_image_and_alpha(path: str | Path, data: bytes | None = None) -> tuple[Image.Image, Image.Image | None]:
    """:func:`open_image_rgb`'s image (transparency on white) and its alpha channel as an 8-bit
    "L" image of the same upright size, or None when the file has no transparency (alpha_mask
    masks the loss with it). One decode for both."""
    path = Path(path)
    try:
        with _open_source(path, data) as im:
            im.load()
            upright = ImageOps.exif_transpose(im)
            alpha = upright.convert("RGBA").getchannel("A") if has_alpha(upright) else None
            rgb = to_rgb(upright)
            return (rgb.copy() if rgb is im else rgb), alpha
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None


def open_mask(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """A loss mask image (data.mask_dir) as an 8-bit "L" image of ``size`` (its training image's
    upright size): its red channel, as kohya reads a conditioning image, upright by its EXIF
    orientation and resized where its size differs."""
    path = Path(path)
    try:
        with _open_source(path, None) as im:
            im.load()
            red = to_rgb(ImageOps.exif_transpose(im)).getchannel("R")
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None
    return red if red.size == size else red.resize(size, Image.Resampling.BILINEAR)


# kohya's color_aug: how often an image is changed, the largest hue shift (degrees) and the gamma range.
COLOR_AUG_SHARE, HUE_SHIFT_DEGREES, GAMMA_RANGE = 0.33, 16.0, (0.95, 1.05)


def color_augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """kohya's color augmentation of an RGB image: a third of the time, half of those a hue shift
    of up to +-16 degrees, the other half a gamma of 0.95-1.05 on values in 0-1 (the recipe kohya
    first took from albumentations); else the image as it is. Draws from ``rng`` only."""
    if rng.random() > COLOR_AUG_SHARE:
        return img
    if rng.random() > 0.5:
        shift = round(rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES) / 360 * 256)
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        return Image.fromarray(hsv, "HSV").convert("RGB")
    gamma = rng.uniform(*GAMMA_RANGE)
    lut = [min(255, round(255 * (v / 255) ** gamma)) for v in range(256)]
    return img.point(lut * 3)


def _ends_with_eoi(path: Path, data: bytes | None) -> bool:
    """True when a JPEG ends with its End-Of-Image marker (a truncated download does not)."""
    if data is not None:
        tail = data[-16:]
    else:
        with open(path, "rb") as fh:
            fh.seek(0, io.SEEK_END)
            fh.seek(max(0, fh.tell() - 16))
            tail = fh.read()
    return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")


def _incomplete(im: Image.Image, path: Path, data: bytes | None) -> bool:
    """Structural truncation check, for processes that set ImageFile.LOAD_TRUNCATED_IMAGES.

    Some host applications set that global; Pillow then pads missing pixel data silently
    instead of raising, so the decode-based check above would pass a cut-off file.
    """
    if data is None:
        data = path.read_bytes()
    if im.format == "JPEG":
        # The last scan must be followed by End-Of-Image (markers cannot occur inside scan data:
        # 0xFF bytes there are stuffed), which also allows data appended after the image.
        return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")
    for tile in im.tile:
        # Uncompressed tiles (BMP, ...) state their stride: the file must hold every row. A tile is
        # (codec, extents, offset, args): a named tuple from Pillow 10.4, a plain one before
        # (Pillow 9.5 in the A1111 WebUI).
        codec, extents, offset, args = tuple(tile)[:4]
        args = args if isinstance(args, tuple) else ()
        if codec == "raw" and len(args) > 1 and isinstance(args[1], int) and args[1] > 0:
            rows = extents[3] - extents[1]
            if offset + abs(args[1]) * rows > len(data):
                return True
    return False


def probe_image(path: str | Path, data: bytes | None = None) -> ImageProbe:
    """Size (after EXIF orientation), format and mode, checking that the pixel data is intact.

    Much cheaper than a full decode: PNG is checked chunk by chunk (CRCs, truncation) by
    ``verify()``; a JPEG that ends with its End-Of-Image marker needs only its header (Pillow
    decodes damaged scan data without complaint anyway), one that does not (truncated, or with
    data appended) is decoded at 1/8 scale via ``draft()``, which still reads the whole stream
    and so catches truncation; other formats are small or fast to decode.
    """
    path = Path(path)
    try:
        with _open_source(path, data) as im:
            width, height = im.size
            fmt, mode = im.format or "?", im.mode
            orientation = _orientation(im)
            if ImageFile.LOAD_TRUNCATED_IMAGES and _incomplete(im, path, data):
                raise OSError("image file is truncated")
            if fmt == "JPEG" and _ends_with_eoi(path, data):
                pass  # complete file: the header is enough (decoding would not catch more)
            elif fmt != "PNG":
                if fmt == "JPEG":
                    im.draft(im.mode, (max(1, width // 8), max(1, height // 8)))
                im.load()
        if fmt == "PNG":
            # verify() must come right after open, and reading EXIF may already have read chunks.
            with _open_source(path, data) as again:
                again.verify()
    except _READ_ERRORS as e:
        raise _read_error(path, e) from None
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return ImageProbe(width=width, height=height, format=fmt, mode=mode)
