"""Single-file checkpoints: read, hash, and find the packaged configs.

A WebUI-style checkpoint (``.safetensors``; ``.ckpt``/``.pt`` only when pickles are allowed)
holds the UNet, VAE and text encoder(s) in the original LDM/SGM key layout. Which family it is
the families answer (:func:`lora_trainer.families.detect_state_dict`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.families import detect_folder
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.models.paths import PICKLE_SUFFIXES, SAFE_SUFFIXES
from lora_trainer.models.tokenizer import cache_root, write_clip_tokenizer_files

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).parent / "configs"

def read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint on the CPU (a pickle only when ``allow_pickle``)."""
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
            raise ModelLoadError(f"{path}: not a readable .safetensors file ({exc}); re-download or re-convert it") from None
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ModelLoadError(
                f"{path}: {suffix} checkpoints are pickles that can run arbitrary code; convert it to .safetensors "
                "or set model.allow_pickle=true if you trust the file")
        log.warning("loading pickle checkpoint %s: only do this with files you trust", path)
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path}: cannot read this checkpoint ({exc}); convert it to .safetensors") from None
        while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    raise ModelLoadError(f"{path}: unknown checkpoint type {suffix!r}; use a .safetensors file or a diffusers folder")


def family_of_file(path: Path) -> str | None:
    """The family of a single-file checkpoint from its ``.safetensors`` header alone (tensor names
    and shapes; no tensor is read), or None where that cannot tell: a pickle, an unreadable file,
    or no family this trainer knows."""
    found = model_of_file(path)
    return found[0] if found else None


def model_of_file(path: Path) -> tuple[str, str] | None:
    """(family, variant: "dev", "large"; "" for a family without) of a single-file checkpoint from
    its ``.safetensors`` header alone, or None as :func:`family_of_file`."""
    if path.suffix.lower() not in SAFE_SUFFIXES:
        return None
    from safetensors import safe_open

    from lora_trainer.families import detect_state_dict

    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}  # noqa: SIM118
        family = detect_state_dict(shapes, str(path))
        return family.name, family.variant_of_state_dict(shapes) if family.variants() else ""
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types; detection its ModelLoadError
        log.debug("no family from the header of %s: %s", path, exc)
        return None


def prepared_config_folder(name: str, source: Path | None = None) -> Path:
    """A config-only diffusers folder (packaged configs + generated tokenizer files) in the cache.

    ``source`` overrides the packaged folder (tests use configs for tiny models). The copy is
    rebuilt when the source configs change (keyed by their digest).
    """
    source = Path(source) if source is not None else CONFIGS_DIR / name
    files = sorted(p for p in source.rglob("*.json") if p.is_file())
    if not (source / "model_index.json").is_file():
        raise ModelLoadError(f"{source}: config folder lacks model_index.json")
    digest = hashlib.sha256(b"".join(p.relative_to(source).as_posix().encode() + p.read_bytes() for p in files))
    target = cache_root() / "configs" / f"{name}-{digest.hexdigest()[:12]}"
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    index = json.loads((source / "model_index.json").read_text())
    for folder, pad in detect_folder(source, index).tokenizer_pads:
        if folder in index:
            write_clip_tokenizer_files(tmp / folder, pad_token=pad)
    atomic_write_text(tmp / ".complete", "")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_hashes(path: Path) -> tuple[str, str]:
    """(sha256 of the file, the WebUI's legacy 8-hex short hash), cached by path, size and mtime.

    The legacy hash is sha256 of 64 KiB read at offset 1 MiB — what A1111 shows as the old
    "model hash" and what kohya writes as ss_sd_model_hash.
    """
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cache_root() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]["sha256"], cache[key]["legacy"]
    full = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            full.update(block)
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    cache[key] = {"sha256": full.hexdigest(), "legacy": legacy}
    try:
        atomic_write_text(cache_file, json.dumps(cache, indent=0))
    except OSError:
        log.debug("could not write the hash cache %s", cache_file)
    return full.hexdigest(), legacy
