"""A small dataset drawn on the fly: coloured shapes on coloured backgrounds, with captions.

It lets the demo command, tests and first-time users train end to end with no download. Drawing
is deterministic, so the same call gives the same bytes.

Two worlds share the drawing code: the demo base model (``models/demo_base.py``) was trained on
shapes in the eight ``COLOURS``; the demo dataset puts every shape on a ``LESSON_COLOUR``
background, a colour the base model has never seen, so a LoRA trained on it visibly teaches it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from PIL import Image, ImageDraw

from lora_trainer.data.captions import METADATA_NAME, format_metadata_csv
from lora_trainer.fsutil import atomic_write_bytes, backup_file

SIZE = 128
_SUPERSAMPLE = 4  # drawn large and shrunk, for smooth edges
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
LESSON_COLOUR = "pink"  # the demo dataset's background: never in the base model's training images
LESSON_RGB = (255, 105, 180)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    # star: 5 outer points alternating with inner ones
    pts = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return pts


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def draw_scene(shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], cx: float, cy: float,
               r: float, size: int = SIZE) -> Image.Image:
    """A ``size`` x ``size`` image of one shape; centre and radius are fractions of the side."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(img)
    cx, cy, r = cx * big, cy * big, r * big
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fg)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r), fill=fg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def caption_for(shape: str, fg: str, bg: str) -> str:
    return f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def draw_item(index: int) -> tuple[Image.Image, str]:
    """The ``index``-th demo image (SIZE x SIZE RGB): a shape on the lesson colour, and its caption."""
    names = list(COLOURS)
    shape = SHAPES[index % len(SHAPES)]
    fg = names[(index * 3) % len(names)]
    # Position and size vary with the index so images of the same shape are not identical.
    r = 0.22 + 0.06 * ((index // len(SHAPES)) % 3)
    cx = 0.5 + 0.12 * math.sin(index * 1.7)
    cy = 0.5 + 0.12 * math.cos(index * 1.3)
    img = draw_scene(shape, COLOURS[fg], LESSON_RGB, cx, cy, r)
    return img, caption_for(shape, fg, LESSON_COLOUR)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file():
        if path.read_bytes() == data:
            return
        backup_file(path)  # someone else's file of the same name: keep a copy
    atomic_write_bytes(path, data)


def make_demo_dataset(folder: str | Path, n: int = 8) -> Path:
    """Write ``n`` demo images (``demo_000.png`` ...) and ``metadata.csv`` into ``folder``.

    Idempotent: files already holding the same bytes are left alone. Returns the folder.
    """
    if n < 1:
        raise ValueError(f"n={n}: a demo dataset needs at least one image")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str] = {}
    for i in range(n):
        img, caption = draw_item(i)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        name = f"demo_{i:03d}.png"
        _write_if_changed(folder / name, buf.getvalue())
        captions[name] = caption
    _write_if_changed(folder / METADATA_NAME, format_metadata_csv(captions).encode("utf-8"))
    return folder
