"""Caption a folder in batches: the function behind ``caption`` on the CLI and in the tab.

Captions go to ``metadata.csv`` and/or ``.txt`` sidecars through :mod:`lora_trainer.data.captions`
(atomic writes, timestamped backups of what is replaced). Images are only ever read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lora_trainer.caption.blip import BlipOptions, Captioner
from lora_trainer.caption.clip import ClipInterrogator, ClipOptions
from lora_trainer.caption.tags import add_trigger_to
from lora_trainer.data.captions import (
    METADATA_NAME,
    list_images,
    read_captions,
    read_metadata_csv,
    read_sidecar,
    write_captions,
)
from lora_trainer.data.images import open_image_rgb
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError

log = logging.getLogger(__name__)

MODELS = ("blip", "clip", "both")
FORMATS = ("csv", "txt", "both")
MODES = ("overwrite", "append", "skip-existing")
DECODE_MIN = 384
ProgressFn = Callable[[int, int, str], None]  # (images done, images to do, current file)


@dataclass
class CaptionReport:
    """What a run did (or, for a dry run, would do)."""

    folder: Path
    captions: dict[str, str] = field(default_factory=dict)  # {relative path: caption} written
    skipped: list[str] = field(default_factory=list)  # kept their caption (skip-existing)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    backups: list[Path] = field(default_factory=list)
    dry_run: bool = False
    seconds: float = 0.0

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        n = len(self.captions)
        rate = f" ({n / self.seconds:.2f} images/s)" if self.seconds > 0 and n else ""
        lines = [f"{self.folder}: {verb} {n} caption(s), skipped {len(self.skipped)}, "
                 f"unreadable {len(self.unreadable)}{rate}"]
        lines += [f"  unreadable: {rel}: {why}" for rel, why in self.unreadable]
        if self.backups:
            lines.append(f"  backups: {len(self.backups)} file(s), e.g. {self.backups[0]}")
        return "\n".join(lines)


def _open_image(path: Path) -> Image.Image:
    # BLIP sees 384x384 and CLIP 224x224: large JPEGs may decode at a reduced scale (much faster).
    return open_image_rgb(path, min_size=(DECODE_MIN, DECODE_MIN))


def _join(*parts: str | None) -> str:
    cleaned = [p.strip().strip(",").strip() for p in parts if p]
    return ", ".join(p for p in cleaned if p)


def compose_caption(generated: str, *, existing: str | None = None, mode: str = "overwrite",
                    trigger: str | None = None, prefix: str = "", suffix: str = "") -> str:
    """``[trigger, ][existing, ]prefix, generated, suffix`` — trigger first and only once."""
    new = _join(prefix, generated, suffix)
    text = _join(existing, new) if mode == "append" and existing and existing.strip() else new
    return add_trigger_to(text, trigger) if trigger else text


def existing_captions(folder: Path, fmt: str, metadata_path: str | Path | None = None,
                      extension: str = ".txt") -> dict[str, str]:
    """Captions already there, from the files ``fmt`` writes to."""
    csv_path = Path(metadata_path) if metadata_path else folder / METADATA_NAME
    if fmt == "both":
        return read_captions(folder, metadata_path if csv_path.is_file() else None, extension)
    if fmt == "csv":
        if not csv_path.is_file():
            return {}
        base = csv_path.parent
        out = {}
        for name, caption in read_metadata_csv(csv_path).items():
            try:
                out[(base / name).resolve().relative_to(folder.resolve()).as_posix()] = caption
            except ValueError:
                out[name] = caption
        return out
    out = {}
    for image in list_images(folder):
        text = read_sidecar(image, extension)
        if text is not None:
            out[image.relative_to(folder).as_posix()] = text
    return out


def _check_args(model: str, fmt: str, mode: str, batch_size: int) -> None:
    for value, allowed, flag in ((model, MODELS, "--model"), (fmt, FORMATS, "--format"), (mode, MODES, "--mode")):
        if value not in allowed:
            raise ConfigError(f"{flag} {value!r}: expected one of {', '.join(allowed)}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be 1 or more, got {batch_size}")


def _load_models(model: str, captioner: Captioner | None, interrogator: ClipInterrogator | None,
                 blip: BlipOptions | None, clip: ClipOptions | None):
    if model in ("blip", "both") and captioner is None:
        from lora_trainer.caption.blip import load_blip

        captioner = load_blip(blip)
    if model in ("clip", "both") and interrogator is None:
        from lora_trainer.caption.clip import load_clip

        interrogator = load_clip(clip)
    return (captioner if model != "clip" else None), (interrogator if model != "blip" else None)


def _caption_batch(images: list[Image.Image], captioner: Captioner | None,
                   interrogator: ClipInterrogator | None) -> list[str]:
    texts = captioner.caption(images) if captioner is not None else [""] * len(images)
    if len(texts) != len(images):
        raise LoraTrainerError(f"the captioner returned {len(texts)} captions for {len(images)} images")
    if interrogator is not None:
        texts = [_join(t, ", ".join(terms)) for t, terms in zip(texts, interrogator.terms_for(images), strict=True)]
    return texts


def caption_folder(folder: str | Path, model: str = "blip", fmt: str = "csv", trigger: str | None = None,
                   prefix: str = "", suffix: str = "", mode: str = "overwrite", dry_run: bool = False,
                   batch_size: int = 8, progress: ProgressFn | None = None, *,
                   captioner: Captioner | None = None, interrogator: ClipInterrogator | None = None,
                   blip: BlipOptions | None = None, clip: ClipOptions | None = None,
                   metadata_path: str | Path | None = None, extension: str = ".txt") -> CaptionReport:
    """Caption every image under ``folder``.

    ``model`` picks BLIP, CLIP terms, or BLIP followed by CLIP terms. ``captioner`` /
    ``interrogator`` let a host pass models it already has (a WebUI's own BLIP); otherwise they
    are loaded from ``blip`` / ``clip`` options, and only if some image needs a caption.
    ``mode``: overwrite, append (after the existing caption) or skip-existing. Unreadable images
    are listed in the report and skipped. ``dry_run`` computes everything and writes nothing.
    """
    _check_args(model, fmt, mode, batch_size)
    folder = Path(folder)
    started = time.perf_counter()
    report = CaptionReport(folder=folder, dry_run=dry_run)
    images = list_images(folder)
    if not images:
        raise DatasetError(f"{folder}: no images found (.jpg .jpeg .png .webp .bmp); check --input")
    existing = existing_captions(folder, fmt, metadata_path, extension)
    todo = []
    for path in images:
        rel = path.relative_to(folder).as_posix()
        if mode == "skip-existing" and existing.get(rel, "").strip():
            report.skipped.append(rel)
        else:
            todo.append((rel, path))
    if todo:
        captioner, interrogator = _load_models(model, captioner, interrogator, blip, clip)
    done = 0
    for start in range(0, len(todo), batch_size):
        batch, pixels = [], []
        for rel, path in todo[start:start + batch_size]:
            try:
                pixels.append(_open_image(path))
                batch.append(rel)
            except DatasetError as e:
                report.unreadable.append((rel, str(e).split(": ", 1)[-1]))
        for rel, text in zip(batch, _caption_batch(pixels, captioner, interrogator) if pixels else [], strict=True):
            report.captions[rel] = compose_caption(text, existing=existing.get(rel), mode=mode,
                                                   trigger=trigger, prefix=prefix, suffix=suffix)
        done += len(todo[start:start + batch_size])
        if progress is not None:
            progress(done, len(todo), todo[min(done, len(todo)) - 1][0])
    if report.captions and not dry_run:
        report.backups = write_captions(folder, report.captions, fmt, metadata_path, extension)
    report.seconds = time.perf_counter() - started
    return report


def detect_format(folder: str | Path, metadata_path: str | Path | None = None) -> str:
    """``csv`` when the folder has a metadata.csv, else ``txt`` (for the tag tools)."""
    csv_path = Path(metadata_path) if metadata_path else Path(folder) / METADATA_NAME
    return "csv" if csv_path.is_file() else "txt"


def edit_captions(folder: str | Path, edit: Callable[[dict[str, str]], dict[str, str]], fmt: str | None = None,
                  dry_run: bool = False, metadata_path: str | Path | None = None,
                  extension: str = ".txt") -> tuple[dict[str, str], dict[str, str], list[Path]]:
    """Apply a tag tool to a folder's captions; write only the captions that changed.

    Returns (before, after, backups). ``fmt`` None picks the format already in use.
    """
    folder = Path(folder)
    fmt = fmt or detect_format(folder, metadata_path)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    before = existing_captions(folder, fmt, metadata_path, extension)
    if not before:
        raise DatasetError(f"{folder}: no captions found ({fmt}); caption the folder first")
    after = edit(dict(before))
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    backups: list[Path] = []
    if changed and not dry_run:
        backups = write_captions(folder, changed, fmt, metadata_path, extension)
    return before, after, backups
