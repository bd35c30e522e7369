"""Read and write captions: ``metadata.csv`` (lora-scripts) and ``.txt`` sidecars (kohya).

``metadata.csv`` has a header ``filename,prompt`` (Hugging Face's ``file_name,text`` is read and
kept too) and one row per image; fields may be quoted and
hold commas, quotes, newlines and any Unicode. Sidecars are ``<image stem><extension>`` beside the
image. Writers are atomic and back up the file they replace; images are never touched.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lora_trainer.errors import DatasetError
from lora_trainer.fsutil import atomic_write_text, backup_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_NAME = "metadata.csv"
CSV_COLUMNS = ("filename", "prompt")


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (hidden folders such as ``.backup``/``.cache`` skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder; set data.train_data_dir to your image folder")
    pattern = "**/*" if recursive else "*"
    out = []
    for p in folder.glob(pattern):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            out.append(p)
    return sorted(out)


# Column names of the file name and the caption: lora-scripts' "filename,prompt" and the Hugging
# Face ImageFolder "file_name,text" (the first of each tuple is what a new file gets).
FILENAME_COLUMNS = ("filename", "file_name")
CAPTION_COLUMNS = ("prompt", "caption", "text")


def _read_rows(path: Path) -> list[list[str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"{path}: caption file not found (data.metadata_path)") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    return list(csv.reader(io.StringIO(text, newline="")))


def _columns(path: Path, header: list[str]) -> tuple[int, int]:
    """(file name column, caption column) of a header, or DatasetError."""
    names = [h.strip().lower() for h in header]
    fi = next((names.index(k) for k in FILENAME_COLUMNS if k in names), None)
    pi = next((names.index(k) for k in CAPTION_COLUMNS if k in names), None)
    if fi is None or pi is None:
        raise DatasetError(f"{path}: first row must be the header 'filename,prompt' (or Hugging Face's "
                           f"'file_name,text'); found {header!r}")
    return fi, pi


def read_metadata_csv(path: str | Path) -> dict[str, str]:
    """{filename: caption} from a ``filename,prompt`` (or ``file_name,text``) CSV; file names are
    relative to the CSV's folder."""
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        return {}
    fi, pi = _columns(path, rows[0])
    captions: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) <= max(fi, pi):
            raise DatasetError(f"{path} row {n}: expected columns {rows[0][fi]},{rows[0][pi]}, got {row!r}")
        name = row[fi].strip()
        if name in captions:
            raise DatasetError(f"{path} row {n}: '{name}' appears twice; keep one row per image")
        captions[name] = row[pi]
    return captions


def format_metadata_csv(captions: dict[str, str], like: list[list[str]] | None = None) -> str:
    """The CSV text of ``captions``. ``like`` (the rows of the file being replaced) keeps its
    header and any other columns; without it the header is ``filename,prompt``."""
    header = list(like[0]) if like else list(CSV_COLUMNS)
    fi, pi = _columns(Path("metadata.csv"), header) if like else (0, 1)
    old = {row[fi].strip(): row for row in (like or [])[1:] if len(row) > max(fi, pi)}
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    writer.writerow(header)
    for name in sorted(captions):
        row = list(old.get(name, [""] * len(header)))
        row += [""] * (len(header) - len(row))
        row[fi], row[pi] = name, captions[name]
        writer.writerow(row)
    return buf.getvalue()


def write_metadata_csv(path: str | Path, captions: dict[str, str], backup: bool = True) -> Path | None:
    """Write ``captions`` atomically, in the header (and columns) the file already has; return
    the backup of the replaced file (if any)."""
    path = Path(path)
    like = _read_rows(path) if path.is_file() else None
    if like:
        _columns(path, like[0])  # an unreadable header is named here, before anything is written
    saved = backup_file(path) if backup else None
    atomic_write_text(path, format_metadata_csv(captions, like or None))
    return saved


def sidecar_path(image: str | Path, extension: str = ".txt") -> Path:
    image = Path(image)
    if not extension.startswith("."):
        extension = "." + extension
    return image.with_suffix(extension)


def read_sidecar(image: str | Path, extension: str = ".txt") -> str | None:
    p = sidecar_path(image, extension)
    if not p.is_file():
        return None
    try:
        return p.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{p}: not UTF-8 text ({e.reason}); save it as UTF-8") from None


def write_sidecar(image: str | Path, caption: str, extension: str = ".txt",
                  backup: bool = True) -> Path | None:
    p = sidecar_path(image, extension)
    saved = backup_file(p) if backup else None
    atomic_write_text(p, caption)
    return saved


def read_captions(folder: str | Path, metadata_path: str | Path | None = None,
                  extension: str = ".txt") -> dict[str, str]:
    """{path relative to ``folder`` (posix): caption} from the CSV if given/present, else sidecars.

    With a CSV, a sidecar fills in images the CSV does not list.
    """
    folder = Path(folder)
    captions: dict[str, str] = {}
    csv_path = Path(metadata_path) if metadata_path else folder / METADATA_NAME
    if metadata_path or csv_path.is_file():
        base = csv_path.parent
        for name, caption in read_metadata_csv(csv_path).items():
            p = (base / name)
            try:
                rel = p.resolve().relative_to(folder.resolve()).as_posix()
            except ValueError:
                rel = name
            captions[rel] = caption
    for image in list_images(folder):
        rel = image.relative_to(folder).as_posix()
        if rel not in captions:
            text = read_sidecar(image, extension)
            if text is not None:
                captions[rel] = text
    return captions


def write_captions(folder: str | Path, captions: dict[str, str], fmt: str = "csv",
                   metadata_path: str | Path | None = None, extension: str = ".txt") -> list[Path]:
    """Write {relative path: caption} as ``csv``, ``txt`` or ``both``; return backups made."""
    if fmt not in ("csv", "txt", "both"):
        raise DatasetError(f"caption format {fmt!r}: expected csv, txt or both")
    folder = Path(folder)
    backups: list[Path] = []
    if fmt in ("csv", "both"):
        csv_path = Path(metadata_path) if metadata_path else folder / METADATA_NAME
        existing = read_metadata_csv(csv_path) if csv_path.is_file() else {}
        merged = {**existing, **captions}
        b = write_metadata_csv(csv_path, merged)
        if b:
            backups.append(b)
    if fmt in ("txt", "both"):
        for rel, caption in captions.items():
            b = write_sidecar(folder / rel, caption, extension)
            if b:
                backups.append(b)
    return backups
