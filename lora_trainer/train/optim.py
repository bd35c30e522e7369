"""Optimizers: AdamW from torch; 8-bit AdamW, Prodigy and Lion when their packages are installed."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from lora_trainer.config import OptimConfig
from lora_trainer.errors import ConfigError
from lora_trainer.torch_compat import fused_adamw_supported

# optimizer name -> (module, class, pip package)
_OPTIONAL: dict[str, tuple[str, str, str]] = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "lion": ("lion_pytorch", "Lion", "lion-pytorch"),
}


def _import_class(name: str) -> Any:
    module, cls, package = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise ConfigError(f"optim.optimizer: '{name}' needs the package '{package}'; "
                          f"run 'pip install {package}' or choose 'adamw'") from None


def build_optimizer(param_groups: list[dict[str, Any]], cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """An optimizer over ``param_groups`` (each with its own "lr"), configured from ``cfg``."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    groups = [g for g in param_groups if g.get("params")]
    if not groups:
        raise ConfigError("network: nothing to train (no LoRA parameters were created); "
                          "check network.target_modules")
    if cfg.optimizer == "adamw":
        kwargs = {"lr": cfg.learning_rate, "betas": betas, "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
        if fused_adamw_supported(device):
            # One fused kernel for all parameters: on a CPU about 3x faster than the default
            # per-tensor loop. The optimizer fills in the group dicts it is given, so a failed
            # attempt gets copies and the fallback starts from the caller's own groups.
            try:
                return torch.optim.AdamW([dict(g) for g in groups], fused=True, **kwargs)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(groups, **kwargs)
    cls = _import_class(cfg.optimizer)
    if cfg.optimizer == "adamw8bit":
        return cls(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                   weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        # Prodigy finds its own step size; lr is a multiplier that should stay near 1.
        return cls(groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)
    return cls(groups, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay)
