"""LoRA files on disk: safe names, versioned paths, atomic safetensors writes, preview images."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save, save_file

from lora_trainer.errors import LoraFormatError, OutputError
from lora_trainer.fsutil import atomic_path, space_problem, tensor_bytes, write_problem

# Device names Windows refuses as file names, with or without an extension.
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
_BAD_CHARS = set('<>:"/\\|?*')
MAX_NAME = 120


def sanitize_name(name: str) -> str:
    """Check a LoRA name and return it trimmed; OutputError when it cannot be a file name.

    The name becomes ``<name>.safetensors`` in a folder the WebUI scans and ``<lora:name:w>`` in
    prompts, so path separators, "..", control characters, characters Windows forbids and
    reserved device names (CON, NUL, COM1...) are refused rather than silently changed.
    """
    original = name
    name = unicodedata.normalize("NFC", str(name)).strip()
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")]
    where = f"output.output_name {original!r}"
    if not name or name in {".", ".."}:
        raise OutputError(f"{where} is empty; give the LoRA a name such as 'my_style'")
    if ".." in name:
        raise OutputError(f"{where} contains '..'; use a plain name without path parts")
    bad = sorted({c for c in name if c in _BAD_CHARS or unicodedata.category(c) == "Cc"})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise OutputError(f"{where} contains {shown}; use letters, digits, '-', '_', '.' or spaces")
    if name.endswith((".", " ")) or name.startswith("."):
        raise OutputError(f"{where} starts with '.' or ends with '.' or a space; remove them")
    if name.split(".")[0].upper().rstrip() in _WINDOWS_RESERVED:
        raise OutputError(f"{where} is a reserved device name on Windows; choose another name")
    if len(name) > MAX_NAME:
        raise OutputError(f"{where} is longer than {MAX_NAME} characters; shorten it")
    return name


# Metadata key naming the run that wrote a file: a resumed run may replace its own files, never
# another run's.
RUN_KEY = "lora_trainer_run"


def file_run_id(path: str | Path) -> str | None:
    """The run id in a LoRA file's metadata (None when absent or unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(RUN_KEY)
    except (SafetensorError, OSError, ValueError):
        return None


def resolve_output_path(folder: str | Path, name: str, overwrite: bool = False, run_id: str | None = None,
                        taken: Callable[[str], bool] | None = None) -> Path:
    """``folder/<name>.safetensors``; if it exists and not ``overwrite``, the first free
    ``<name>_v2``, ``<name>_v3``... (an existing LoRA is never replaced by accident). A file
    written by the run ``run_id`` counts as free: a resumed run continues its own files. A name
    ``taken(name)`` says is another run's (its checkpoints) is not free either."""
    name = sanitize_name(name)
    folder = Path(folder)

    def free(candidate: Path) -> bool:
        if taken is not None and taken(candidate.name.removesuffix(".safetensors")):
            return False
        return not candidate.exists() or (run_id is not None and file_run_id(candidate) == run_id)

    path = folder / f"{name}.safetensors"
    if overwrite or free(path):
        return path
    base, n = name, 2
    m = re.fullmatch(r"(.*)_v(\d+)", name)
    if m:  # my_lora_v2 exists -> my_lora_v3, not my_lora_v2_v2
        base, n = m.group(1), int(m.group(2)) + 1
    while not free(folder / f"{base}_v{n}.safetensors"):
        n += 1
    return folder / f"{base}_v{n}.safetensors"


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor data section of the safetensors file (everything after the header):
    the "addnet" hash A1111 shows and writes into infotext, unaffected by metadata."""
    blob = save(tensors)
    header_len = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write a safetensors LoRA atomically (temporary file beside it, then rename).

    Adds ``sshs_model_hash`` (see :func:`tensor_hash`) unless given, so WebUIs need not hash it."""
    path = Path(path)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise LoraFormatError(f"LoRA metadata {bad[0]!r} is not a string; metadata values must be str")
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {**metadata}
    metadata.setdefault("sshs_model_hash", tensor_hash(plain))
    problem = space_problem(path.parent, tensor_bytes(plain))
    if problem is None:
        try:
            with atomic_path(path) as tmp:
                save_file(plain, str(tmp), metadata=dict(metadata))
            return path
        except (OSError, SafetensorError) as e:
            problem = write_problem(e) or (e.strerror if isinstance(e, OSError) and e.strerror else str(e))
    raise OutputError(f"LoRA {path} not written: {problem}; free some space or choose a writable output folder")


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors LoRA file."""
    path = Path(path)
    if not path.is_file():
        raise LoraFormatError(f"LoRA file {path} not found; give the path of a .safetensors file")
    if path.suffix.lower() != ".safetensors":
        raise LoraFormatError(f"{path} is not a .safetensors file; only safetensors LoRA files are read")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFormatError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from e
    return tensors, metadata


def save_preview_png(lora_path: str | Path, image: Any) -> Path:
    """Save a PIL image as ``<name>.png`` beside the LoRA (the WebUI shows it as the card preview)."""
    target = Path(lora_path).with_suffix(".png")
    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target
