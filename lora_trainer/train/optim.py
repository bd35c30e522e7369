"""Optimizers: AdamW from torch, Adafactor from transformers; 8-bit AdamW, Prodigy and Lion when their
packages are installed."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from lora_trainer.config import OptimConfig, optimizer_kwargs
from lora_trainer.errors import ConfigError
from lora_trainer.torch_compat import fused_adamw_supported

# optimizer name -> (module, class, pip package)
_OPTIONAL: dict[str, tuple[str, str, str]] = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}


def _import_class(name: str) -> Any:
    module, cls, package = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ConfigError(f"optim.optimizer: '{name}' needs the package '{package}'; "
                          f"run 'pip install {package}' or choose 'adamw'") from None


def optimizer_class(cfg: OptimConfig) -> Any:
    """The optimizer's class; ConfigError when its package is missing."""
    return torch.optim.AdamW if cfg.optimizer == "adamw" else _import_class(cfg.optimizer)


def optimizer_settings(cfg: OptimConfig) -> dict[str, Any]:
    """The keyword arguments the optimizer is built with: the optim fields it takes (Prodigy
    finds its own step size, lr a multiplier near 1; it and Lion take no eps), then
    ``optim.optimizer_args`` in their place."""
    kwargs: dict[str, Any] = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adafactor":  # at the schedule's learning rate, as kohya's SDXL recipe runs it
        kwargs |= {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    else:
        kwargs["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in ("adamw", "adamw8bit"):
        kwargs["eps"] = cfg.adam_epsilon
    return {**kwargs, **optimizer_kwargs(cfg)}


def check_optimizer_args(cfg: OptimConfig) -> None:
    """ConfigError naming an ``optim.optimizer_args`` name the optimizer does not take (or its
    missing package), before any model is loaded."""
    cls = optimizer_class(cfg)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = [name for name in optimizer_kwargs(cfg) if name not in params]
    if unknown:
        takes = ", ".join(n for n in params if n not in ("self", "params"))
        raise ConfigError(f"optim.optimizer_args: {cfg.optimizer} takes no {', '.join(map(repr, unknown))}; "
                          f"it takes {takes}")


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """An optimizer over ``param_groups`` (each with its own "lr"), configured from ``cfg``."""
    groups = [g for g in param_groups if g.get("params")]
    if not groups:
        raise ConfigError("network: nothing to train (no LoRA parameters were created); "
                          "check network.target_modules")
    kwargs = optimizer_settings(cfg)
    if cfg.optimizer == "adamw" and fused_adamw_supported(device) and "fused" not in kwargs:
        # One fused kernel for all parameters: on a CPU about 3x faster than the default
        # per-tensor loop. The optimizer fills in the group dicts it is given, so a failed
        # attempt gets copies and the fallback starts from the caller's own groups.
        try:
            return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass
    return optimizer_class(cfg)(groups, **kwargs)
