"""Resumable checkpoints and adapter folders for text LoRA, written atomically.

A checkpoint holds everything a step depends on: the LoRA weights (a PEFT adapter folder),
optimizer, scheduler and loss-scaler state, the RNG states and the data position (epoch and
next micro-batch group). Resuming from it continues exactly as the run that wrote it would have.
Folders are written under a temporary name and renamed into place, so a crash never leaves a
half-written adapter or checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import ConfigError, OutputError
from lora_trainer.fsutil import give_normal_mode
from lora_trainer.train.outputs import run_folder

STATE_FILE = "trainer_state.pt"


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    group: int = 0  # next micro-batch group (optimizer step) within the epoch


def write_folder_atomic(target: Path, fill: Callable[[Path], None], backup: bool = True) -> Path:
    """Build a folder with ``fill(tmp)`` beside ``target`` and rename it into place.

    An existing ``target`` is moved to ``<parent>/.backup/<name>.<time>`` first when ``backup``
    (user outputs), or deleted (our own checkpoints).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        give_normal_mode(tmp, target)
        if target.exists():
            if backup:
                bdir = target.parent / ".backup"
                bdir.mkdir(exist_ok=True)
                os.replace(target, bdir / f"{target.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
            else:
                shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_adapter_dir(output_dir: str | Path, name: str, overwrite: bool) -> Path:
    """``<output_dir>/<name>``, or the first free ``<name>_v2``, ``_v3``... unless ``overwrite``."""
    if not name.strip() or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise OutputError(f"output.output_name: '{name}' is not a usable folder name; use letters, digits, - and _")
    base = Path(output_dir)
    target = base / name
    n = 2
    while target.exists() and not overwrite:
        target = base / f"{name}_v{n}"
        n += 1
    return target


def save_adapter(peft_model: Any, tokenizer: Any, target: Path, info: dict[str, Any], backup: bool = True) -> Path:
    """PEFT adapter folder (adapter_config.json, adapter_model.safetensors) plus tokenizer and run info."""
    def fill(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "lora_trainer.json").write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")

    return write_folder_atomic(target, fill, backup=backup)


def save_checkpoint(folder: Path, peft_model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, pos: Position, info: dict[str, Any]) -> Path:
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "position": asdict(pos),
    }

    def fill(tmp: Path) -> None:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        torch.save(state, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps({**asdict(pos), **info}, indent=2, default=str), encoding="utf-8")

    return write_folder_atomic(folder, fill, backup=False)


def checkpoints_root(output_dir: str | Path, name: str) -> Path:
    """``<output_dir>/checkpoints/<output_name>``: each run's checkpoints under its own name, so
    runs that share an output folder never prune or resume each other's."""
    return run_folder(Path(output_dir), "checkpoints", name)


def _steps(root: Path) -> list[Path]:
    found = sorted(root.glob("step-*"), key=lambda p: p.name) if root.is_dir() else []
    return [p for p in found if (p / STATE_FILE).is_file()]


def find_checkpoint(output_dir: str | Path, resume: str, name: str) -> Path:
    """'latest' -> the newest checkpoint of run ``name`` (``<output_dir>/checkpoints/<name>/step-*``,
    or an older release's ``<output_dir>/checkpoints/step-*``); else the folder given."""
    if resume.strip().lower() == "latest":
        root = checkpoints_root(output_dir, name)
        found = _steps(root) or _steps(root.parent)
        if not found:
            others = sorted(p.name for p in root.parent.iterdir() if p.is_dir() and _steps(p)) if root.parent.is_dir() else []
            also = f" (there are checkpoints of {', '.join(others)}: set output.output_name to that run's name)" if others else ""
            raise ConfigError(f"train.resume: latest, but {root} holds no checkpoint{also}; run without resume first")
        return found[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file():
        raise ConfigError(f"train.resume: {folder} is not a checkpoint folder (no {STATE_FILE}); "
                          "give <output_dir>/checkpoints/<output_name>/step-N or 'latest'")
    return folder


def load_checkpoint(folder: Path, peft_model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any) -> Position:
    """Restore weights, optimizer, scheduler, scaler and RNG; return the data position."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ConfigError(f"train.resume: {folder} does not match this model/LoRA config "
                          f"(missing {missing[0]}); resume with the same network settings")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    return Position(**state["position"])


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0 or not root.is_dir():
        return
    for old in sorted(root.glob("step-*"), key=lambda p: p.name)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
