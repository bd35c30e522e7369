"""Checks that need no model, run before anything loads.

A run must never train for an hour and then fail on something a glance at the config could
have told: an output name the file system refuses, a base model path that is not there, an
empty data folder, an output folder that cannot be written. ``train``, ``config --check`` and
the app's Start (through :func:`lora_trainer.jobs.start`) all run :func:`preflight`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, DatasetError, LoraTrainerError, ModelLoadError, OutputError

# The longest suffix a run adds to the LoRA name: "<name>_v99-step000000".
_STEP_SUFFIX = "-step000000"


def host_loads_base_model(host: Any) -> bool:
    """True when the run loads ``model.base_model`` itself (standalone); a WebUI trains its own model."""
    return host is None or host.loaded_model() is None


def find_problems(cfg: TrainConfig, *, check_model: bool = True) -> list[LoraTrainerError]:
    """Every problem found without loading a model, each an error with a one-line message."""
    checks: list[Callable[[TrainConfig], None]] = [check_output_name, check_output_dir, check_data_dirs,
                                                   check_files, check_compile, check_optimizer]
    if check_model:
        checks.insert(2, check_base_model)
    problems: list[LoraTrainerError] = []
    for check in checks:
        try:
            check(cfg)
        except LoraTrainerError as e:
            problems.append(e)
    return problems


def preflight(cfg: TrainConfig, host: Any = None) -> None:
    """Raise the first problem :func:`find_problems` finds (nothing has been loaded yet)."""
    problems = find_problems(cfg, check_model=host_loads_base_model(host))
    if problems:
        raise problems[0]


def check_output_name(cfg: TrainConfig) -> None:
    from lora_trainer.lora.files import sanitize_name

    name = sanitize_name(cfg.output.output_name)
    if cfg.output.save_step_loras:
        try:
            sanitize_name(name + _STEP_SUFFIX)
        except OutputError:
            raise OutputError(f"output.output_name {name!r} is too long for the step LoRAs "
                              f"('{name}{_STEP_SUFFIX}'); shorten it") from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(cfg: TrainConfig) -> None:
    out = Path(cfg.output.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"output.output_dir: {out} is a file, not a folder; choose a folder")
    existing = _nearest_existing(out.absolute())
    if not existing.is_dir():
        raise OutputError(f"output.output_dir: {out} cannot be created ({existing} is a file); choose another folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output.output_dir: {existing} is not writable (read-only?); "
                          "choose a folder you can write to")


def check_base_model(cfg: TrainConfig) -> None:
    from lora_trainer.models.paths import PICKLE_SUFFIXES, SAFE_SUFFIXES, base_model_path

    if cfg.model.vae and not Path(cfg.model.vae).expanduser().exists():
        raise ModelLoadError(f"model.vae: {cfg.model.vae} does not exist; check the path or leave model.vae empty")
    path = base_model_path(cfg.model.base_model)
    if path is None:  # the embedded demo model
        return
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"model.base_model: {path} is not a diffusers model folder (no model_index.json)")
        return
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not cfg.model.allow_pickle:
        raise ModelLoadError(f"model.base_model: {path} is a pickle ({suffix}) that can run arbitrary code; convert "
                             "it to .safetensors or set model.allow_pickle=true if you trust the file")
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise ModelLoadError(f"model.base_model: {path}: unknown checkpoint type {suffix!r}; "
                             "use a .safetensors file or a diffusers folder")


def check_data_dirs(cfg: TrainConfig) -> None:
    """The training folder is set, exists and holds images; a set regularization folder exists."""
    from lora_trainer.data.captions import IMAGE_EXTENSIONS, list_images
    from lora_trainer.data.scan import check_folder

    d = cfg.data
    for key, value in (("data.train_data_dir", d.train_data_dir), ("data.reg_data_dir", d.reg_data_dir)):
        if key == "data.reg_data_dir" and not value:
            continue
        path = check_folder(value, key)
        if not list_images(path):
            raise DatasetError(f"{key}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {path}; put your images there")


def check_files(cfg: TrainConfig) -> None:
    """Files the config names besides the model: captions, a LoRA to start from, a checkpoint."""
    if cfg.data.metadata_path and not Path(cfg.data.metadata_path).expanduser().is_file():
        raise DatasetError(f"data.metadata_path: {cfg.data.metadata_path} does not exist; "
                           "give the caption CSV or leave it empty")
    init = cfg.network.init_from
    if init and not Path(init).expanduser().is_file():
        raise ConfigError(f"network.init_from: {init} does not exist; give a LoRA .safetensors file or leave it empty")
    if cfg.train.resume and cfg.train.resume != "latest":
        from lora_trainer.train.checkpoint import find_checkpoint

        find_checkpoint(cfg.train.resume, cfg.output.output_dir, cfg.output.output_name)


def check_compile(cfg: TrainConfig) -> None:
    """train.compile where this torch cannot compile for the device (too old, no Triton, no compiler)."""
    if not cfg.train.compile:
        return
    from lora_trainer.models.loaders import resolve_device
    from lora_trainer.train.compiled import check_compile as check

    check(resolve_device(cfg.model.device).type)


def check_optimizer(cfg: TrainConfig) -> None:
    """The optimizer's package is installed and takes every name of optim.optimizer_args."""
    from lora_trainer.train.optim import check_optimizer_args

    check_optimizer_args(cfg.optim)
