"""Atomic writes and backups: every output file goes through here.

A file is written to a temporary name in the same folder and renamed over the target, so a
crash never leaves a half-written file and readers never see one. The result has the mode any
other file the user makes would have: a new file follows the umask, a replaced file keeps its mode
(temporary files are created private, 0600, which a WebUI running as another user cannot read).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it
    os.umask(mask)
    return mask


def give_normal_mode(tmp: Path, target: Path) -> None:
    """Set ``tmp``'s mode to what ``target`` should have once ``tmp`` is renamed onto it: the
    mode of the ``target`` it replaces, else what a new file or folder gets under the umask."""
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = (0o777 if tmp.is_dir() else 0o666) & ~current_umask()
    os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        give_normal_mode(tmp, target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    with atomic_path(target) as tmp:
        # newline="" keeps the text exactly as given (CSV writers choose their own line ends).
        with open(tmp, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
    return Path(target)


def backup_file(path: str | os.PathLike[str], backup_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Copy ``path`` to a timestamped backup before it is replaced; return the backup path.

    Backups go to ``backup_dir`` (default: a ``.backup`` folder beside the file). Returns None
    when there is nothing to back up.
    """
    path = Path(path)
    if not path.exists():
        return None
    folder = Path(backup_dir) if backup_dir else path.parent / ".backup"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = folder / f"{path.name}.{stamp}.bak"
    n = 1
    while candidate.exists():
        n += 1
        candidate = folder / f"{path.name}.{stamp}-{n}.bak"
    shutil.copy2(path, candidate)
    return candidate
