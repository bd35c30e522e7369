"""Resumable checkpoints: ``<output_dir>/checkpoints/<lora name>/step-000123/``.

Each run keeps its checkpoints under its own LoRA name, so runs that share an output folder (a
WebUI's, or a CLI user's one folder for everything) never replace, prune or resume each other's.

A checkpoint holds what an exact resume needs: the LoRA parameters in fp32 (not the fp16 kohya
file), optimizer, scheduler and GradScaler states, the Python/NumPy/torch RNG states and the
trainer's noise generator, and the loop position (step, epoch, micro-batch in the epoch). It is
written into a hidden folder and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora_trainer.errors import ConfigError, OutputError
from lora_trainer.fsutil import atomic_write_text, space_problem, tensor_bytes, write_problem
from lora_trainer.train.outputs import run_folder

STATE_FILE = "state.json"
LORA_FILE = "lora.safetensors"
TRAINING_FILE = "training_state.pt"
FINISHED_FILE = "finished.json"  # in a run's folder: it ran to its last step


@dataclass
class LoopPosition:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    position: int = 0  # next micro-batch within the epoch's plan


def checkpoints_dir(output_dir: str | Path, stem: str | None = None) -> Path:
    """``<output_dir>/checkpoints``, or the folder of the run that writes LoRA ``stem``."""
    return run_folder(Path(output_dir), "checkpoints", stem) if stem else Path(output_dir) / "checkpoints"


def rng_states(gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "generator": gen.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(states["torch"])
    gen.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(output_dir: str | Path, pos: LoopPosition, lora_state: dict[str, torch.Tensor],
                    training_state: dict[str, Any], config_yaml: str, keep: int, run: dict[str, str],
                    total_steps: int) -> Path:
    """Write ``checkpoints/<lora name>/step-NNNNNN`` atomically and delete all but the newest
    ``keep`` of that run's name.

    ``run`` (the run's id and LoRA name) goes into state.json, so a resumed run writes its own
    files; ``total_steps`` too, so an unfinished run can be found after a restart."""
    stem = run["lora_name"]
    root = checkpoints_dir(output_dir, stem)
    (root / FINISHED_FILE).unlink(missing_ok=True)  # the name's run is going on (again)
    final = root / f"step-{pos.step:06d}"
    tmp = root / f".{final.name}.partial"
    lora_cpu = {k: v.detach().cpu().contiguous() for k, v in lora_state.items()}
    for stale in root.glob(".step-*.partial"):  # left by a killed run: it holds space
        shutil.rmtree(stale, ignore_errors=True)
    problem = space_problem(root, tensor_bytes(lora_cpu) + tensor_bytes(training_state))
    if problem is None:
        try:
            _write_folder(tmp, lora_cpu, training_state, config_yaml,
                          json.dumps({**asdict(pos), "total_steps": total_steps, "run": run}, indent=2))
        except (OSError, RuntimeError, SafetensorError) as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a partial folder must not hold the space
            problem = write_problem(e)
            if problem is None:
                raise
    if problem is not None:
        raise OutputError(f"checkpoint {final.name} not written to {root}: {problem}; {resume_hint(output_dir, stem)}")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune_checkpoints(root, keep)
    return final


def _write_folder(tmp: Path, lora_state: dict[str, torch.Tensor], training_state: dict[str, Any],
                  config_yaml: str, state_json: str) -> None:
    tmp.mkdir(parents=True)
    save_file(lora_state, str(tmp / LORA_FILE))
    torch.save(training_state, tmp / TRAINING_FILE)
    atomic_write_text(tmp / "config.yaml", config_yaml)
    atomic_write_text(tmp / STATE_FILE, state_json)


def resume_hint(output_dir: str | Path, name: str) -> str:
    """What to do after a failed save of run ``name``: where its last good checkpoint is and how to go on."""
    found = latest_checkpoint(output_dir, name)
    if found is None:
        return "no checkpoint of this run was saved yet: make room or choose a writable output folder, then start again"
    return (f"the last good checkpoint is {found}: make room (or make the folder writable), "
            "then resume with --set resume=latest")


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoints directly in ``root``, by step."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def prune_checkpoints(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def runs_named(name: str) -> re.Pattern[str]:
    """The LoRA names runs of ``output.output_name`` write: ``name``, or ``name_v2``... when
    another run's file had that name."""
    return re.compile(re.escape(name) + r"(_v\d+)?")


def latest_checkpoint(output_dir: str | Path, name: str) -> Path | None:
    """The newest checkpoint of a run named ``name`` (or ``name_vN``) in ``output_dir``: the one
    ``train.resume: latest`` continues. Checkpoints of runs with other names are never taken;
    ones written directly into ``checkpoints/`` (an older layout) are, when their run's name fits."""
    root, fits = checkpoints_dir(output_dir), runs_named(name)
    if not root.is_dir():
        return None
    found = [p for d in root.iterdir() if d.is_dir() and fits.fullmatch(d.name) for p in list_checkpoints(d)]
    found += [p for p in list_checkpoints(root) if fits.fullmatch(checkpoint_run(p).get("lora_name") or name)]
    return _newest(found)


def _newest(found: list[Path]) -> Path | None:
    """The checkpoint saved last (a run resumed from an earlier step saves lower steps later)."""
    return max(found, key=lambda p: ((p / STATE_FILE).stat().st_mtime_ns, int(p.name.split("-", 1)[1])), default=None)


def held_by_other_run(output_dir: str | Path, stem: str, run_id: str) -> bool:
    """Whether ``checkpoints/<stem>`` holds checkpoints of a run other than ``run_id``."""
    return any(checkpoint_run(p).get("run_id") != run_id for p in list_checkpoints(checkpoints_dir(output_dir, stem)))


def checkpoint_names(output_dir: str | Path) -> list[str]:
    """The LoRA names that have checkpoints in ``output_dir``, for saying which there are."""
    root = checkpoints_dir(output_dir)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and list_checkpoints(d)) if root.is_dir() else []


def mark_finished(output_dir: str | Path, stem: str, step: int) -> None:
    """Run ``stem`` ran to its last step: its checkpoints are not an unfinished run's."""
    root = checkpoints_dir(output_dir, stem)
    if root.is_dir():
        atomic_write_text(root / FINISHED_FILE, json.dumps({"step": step}) + "\n")


@dataclass
class Unfinished:
    """A run that stopped, crashed or was closed before its last step, and its newest checkpoint."""

    name: str
    checkpoint: Path
    step: int
    total_steps: int
    saved_at: float  # seconds since the epoch


def unfinished_runs(output_dir: str | Path) -> list[Unfinished]:
    """The runs in ``output_dir`` that can be taken on from a checkpoint, the newest first."""
    root = checkpoints_dir(output_dir)
    found = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        newest = _newest(list_checkpoints(folder)) if folder.is_dir() else None
        if newest is None:
            continue
        try:
            state = json.loads((newest / STATE_FILE).read_text(encoding="utf-8"))
            done = json.loads((folder / FINISHED_FILE).read_text(encoding="utf-8"))["step"] \
                if (folder / FINISHED_FILE).is_file() else -1
        except (OSError, ValueError, KeyError):
            continue  # a damaged file: not offered, and resume: latest names the problem
        step, total = int(state.get("step", 0)), int(state.get("total_steps") or 0)
        if step < total and done < step:
            found.append(Unfinished(folder.name, newest, step, total, (newest / STATE_FILE).stat().st_mtime))
    return sorted(found, key=lambda u: u.saved_at, reverse=True)


def find_checkpoint(resume: str, output_dir: str | Path, name: str) -> Path | None:
    """The folder ``train.resume`` names: 'latest' (run ``name``'s newest; None when there is none
    yet) or a path."""
    if resume == "latest":
        return latest_checkpoint(output_dir, name)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume: {path} is not a checkpoint folder (no {STATE_FILE}); "
                          f"use 'latest' or a folder like {checkpoints_dir(output_dir, name)}/step-000100")
    return path


def checkpoint_run(path: Path) -> dict[str, str]:
    """The run id and LoRA name a checkpoint was saved with ({} for older checkpoints)."""
    return dict(json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("run") or {})


def load_checkpoint(path: Path) -> tuple[LoopPosition, dict[str, torch.Tensor], dict[str, Any]]:
    saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    pos = LoopPosition(**{f.name: saved[f.name] for f in fields(LoopPosition) if f.name in saved})
    lora_state = load_file(str(path / LORA_FILE))
    # Our own file: optimizer states and RNG tuples need more than weights_only allows.
    training_state = torch.load(path / TRAINING_FILE, map_location="cpu", weights_only=False)
    return pos, lora_state, training_state
