"""Traced memory figures kept on disk, so a WebUI's first page after a restart sizes "auto" at once.

A trace (:func:`lora_trainer.bench.estimate.trace_step`) runs a whole training step on the meta
device: seconds per setting, tens of seconds for the search "auto" makes on a busy CPU. Its
figures depend only on its arguments, this package's code and the torch and diffusers versions,
so they are written to ``<cache>/estimates/<stamp>.json``, the stamp a digest of all of those;
another version of any of them reads (and writes) a file of its own, and the older files go.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = (".py", ".json")  # the code and the packaged model configs a trace builds from


@functools.lru_cache(maxsize=4)
def stamp(package: Path = PACKAGE) -> str:
    """A digest of the package's code and configs and of the torch and diffusers versions."""
    digest = hashlib.sha256()
    for name in ("torch", "diffusers"):
        try:
            digest.update(f"{name}=={metadata.version(name)}\n".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name} missing\n".encode())
    for path in sorted(p for p in package.rglob("*") if p.suffix in _SOURCES and p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _folder() -> Path:
    from lora_trainer.models.tokenizer import cache_root

    return cache_root() / "estimates"


def _read(file: Path) -> dict[str, Any]:
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: traced again
        return {}
    return found if isinstance(found, dict) else {}


def _write(file: Path, key: str, figures: dict[str, int]) -> None:
    from lora_trainer.fsutil import atomic_write_text

    try:
        kept = _read(file)
        kept[key] = figures
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(kept, indent=1, sort_keys=True) + "\n")
        for old in file.parent.glob("*.json"):  # another version's figures
            if old != file:
                old.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError) as e:  # a read-only cache, or figures JSON cannot hold
        log.debug("traced figures not kept in %s: %s", file, e)


def on_disk(trace: Callable[..., dict[str, int]]) -> Callable[..., dict[str, int]]:
    """``trace`` with its figures kept in the cache folder under its name and arguments."""
    @functools.wraps(trace)
    def cached(*args: Any, **kwargs: Any) -> dict[str, int]:
        key = json.dumps([trace.__name__, list(args), sorted(kwargs.items())], default=repr)
        file = _folder() / f"{stamp()}.json"
        found = _read(file).get(key)
        if isinstance(found, dict):
            return found
        figures = trace(*args, **kwargs)
        _write(file, key, figures)
        return figures
    return cached
