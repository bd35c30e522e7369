"""What ``install.py`` installs into a WebUI's Python: only what is missing, never a host pin.

The A1111 WebUI (v1.10.x) reinstalls any package that differs from its own pins on every start;
an extension that upgrades one of them causes a reinstall loop. So the plan installs a package
only when it is absent (or too old to work at all), pins versions proven to work with the
WebUI's pins (transformers 4.30.2, accelerate 0.21.0, safetensors 0.4.x, torch 2.1.2; see
``tests/webui_pins/check.sh``), and installs with ``--no-deps`` where resolving dependencies
could replace a pinned package.

Pure decision logic: no imports of pip, the WebUI or the packages themselves, so it is
testable anywhere.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

# Packages the WebUI owns: never installed, upgraded or downgraded by us, even when missing
# (a missing one means a broken WebUI install, which is the WebUI's to repair).
HOST_PINNED: frozenset[str] = frozenset({
    "torch", "torchvision", "torchaudio", "xformers", "gradio", "gradio-client", "transformers",
    "accelerate", "safetensors", "tokenizers", "huggingface-hub", "numpy", "pillow", "fastapi",
    "pydantic", "open-clip-torch", "pytorch-lightning", "protobuf", "httpx", "httpcore",
    "einops", "omegaconf", "scikit-image", "kornia", "spandrel", "setuptools",
})


@dataclass(frozen=True)
class Requirement:
    """One package we need: ``minimum`` is the oldest version our code works with; ``install``
    is the exact version installed when it is missing (newest proven with the WebUI's pins)."""

    name: str
    minimum: str
    install: str
    no_deps: bool = False
    why: str = ""
    python_below: tuple[int, int] | None = None  # needed only before this Python (its stdlib has it)


# peft 0.13.2: newest that imports with transformers 4.30.2 (0.14 needs transformers' Cache) and
# accelerate 0.21.0 (0.15+ need accelerate's clear_device_cache); its dependencies are all WebUI
# packages already present, so --no-deps keeps pip from touching them.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("diffusers", "0.27.0", "0.35.2", no_deps=True, why="schedulers and model configs"),
    Requirement("peft", "0.13.0", "0.13.2", no_deps=True, why="LoRA layers"),
    Requirement("pyyaml", "5.1", "6.0.2", why="training configs"),
    # kohya / lora-scripts .toml configs: tomllib from Python 3.11; A1111 and Forge Classic run 3.10.
    # Pure Python without dependencies.
    Requirement("tomli", "1.1.0", "2.2.1", no_deps=True, why="kohya and lora-scripts .toml configs",
                python_below=(3, 11)),
    # diffusers' own dependencies that are not WebUI pins (normally present already).
    Requirement("filelock", "3.0", "3.16.1", why="diffusers"),
    Requirement("regex", "2020.1.8", "2024.11.6", why="diffusers"),
    Requirement("requests", "2.20", "2.32.3", why="diffusers"),
    Requirement("importlib-metadata", "4.0", "8.5.0", why="diffusers"),
)

# diffusers is installed with --no-deps so it cannot pull a huggingface_hub 1.x that breaks
# transformers 4.30.2; the version is the newest whose hub requirement the installed hub meets
# (from each release's metadata): (oldest hub it accepts, diffusers version). 0.35.2 is the last
# release that imports on the WebUI's torch 2.1.2 (0.36+ reference torch.xpu at import time).
DIFFUSERS_BY_HUB: tuple[tuple[str, str], ...] = (
    ("0.34.0", "0.35.2"),
    ("0.27.0", "0.34.0"),
    ("0.23.2", "0.32.2"),
    ("0.20.2", "0.27.2"),
)


def diffusers_for_hub(hub_version: str | None) -> str | None:
    """The diffusers release to install next to ``hub_version`` (None: no release fits)."""
    if hub_version is None:
        return None
    for min_hub, release in DIFFUSERS_BY_HUB:
        if version_tuple(hub_version) >= version_tuple(min_hub):
            return release
    return None


@dataclass(frozen=True)
class Action:
    name: str
    spec: str  # what goes to pip, e.g. "peft==0.13.2"
    args: str  # pip arguments after "install", as launch.run_pip takes them
    reason: str


def normalize(name: str) -> str:
    """PEP 503 name: ``Open_Clip.Torch`` -> ``open-clip-torch``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version: str) -> tuple[int, ...]:
    """Leading numeric release parts: ``"0.4.2rc1"`` -> (0, 4, 2); ``"2.1.2+cu121"`` -> (2, 1, 2)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.group() != piece:
            break
    return tuple(parts)


def plan_installs(installed_version: Callable[[str], str | None],
                  requirements: tuple[Requirement, ...] = REQUIREMENTS,
                  python: tuple[int, int] | None = None) -> list[Action]:
    """Actions to take, given ``installed_version(name) -> version or None``, for the WebUI's
    ``python`` version (default: this one).

    Nothing when everything is present at or above its minimum (the second start installs
    nothing). A package the WebUI pins is never planned, whatever its state.
    """
    python = python or (sys.version_info[0], sys.version_info[1])
    actions: list[Action] = []
    for req in requirements:
        if normalize(req.name) in HOST_PINNED or (req.python_below and python >= req.python_below):
            continue
        have = installed_version(req.name)
        if have is not None and version_tuple(have) >= version_tuple(req.minimum):
            continue
        version = req.install
        if normalize(req.name) == "diffusers":
            hub = installed_version("huggingface_hub")
            version = diffusers_for_hub(hub) or ""
            if not version:
                actions.append(Action(req.name, "", "", f"cannot install: huggingface_hub {hub} is older "
                                      f"than {DIFFUSERS_BY_HUB[-1][0]}; update the WebUI"))
                continue
        spec = f"{req.name}=={version}"
        reason = "missing" if have is None else f"installed {have} is older than {req.minimum}"
        args = f'install "{spec}"' + (" --no-deps" if req.no_deps else "")
        actions.append(Action(req.name, spec, args, f"{reason}; needed for {req.why}"))
    return actions


def check_pins_untouched(actions: list[Action]) -> None:
    """Guard used by install.py and the tests: no action may name a host-pinned package."""
    bad = [a.name for a in actions if normalize(a.name) in HOST_PINNED]
    if bad:
        raise ValueError(f"install plan names WebUI-pinned packages {bad}; remove them from REQUIREMENTS")
