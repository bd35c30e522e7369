"""Stand-in for ``backend/patcher/base.py`` (Forge Neo): LoRA patches on a shared model.

``clone()`` shares the model and the backups; ``add_patches`` records LoRA deltas by state-dict
key; ``patch_model`` merges them into the weights (replacing each Parameter, backup on the
offload device) and ``unpatch_model`` puts the backups back - what the memory manager calls when
it loads and unloads.
"""

import uuid

import torch
from torch import nn


def get_attr(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj, key: str, value: torch.Tensor) -> None:
    *parents, name = key.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, name, nn.Parameter(value, requires_grad=False))


class ModelPatcher:
    def __init__(self, model: nn.Module, load_device, offload_device, size=0, *, current_device=None) -> None:
        self.model = model
        self.patches: dict[str, list] = {}
        self.backup: dict[str, torch.Tensor] = {}
        self.patches_uuid = uuid.uuid4()
        self.load_device, self.offload_device = load_device, offload_device
        self.parent = None
        if not hasattr(model, "current_weight_patches_uuid"):
            model.current_weight_patches_uuid = None

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.backup = self.backup
        n.parent = self
        return n

    def is_clone(self, other) -> bool:
        return self.model is getattr(other, "model", None)

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0, *,
                    filename=None, online_mode=False) -> list[str]:
        keys = set(self.model.state_dict())
        added = []
        for key, lora in patches.items():
            if key in keys:
                self.patches.setdefault(key, []).append((strength_patch, lora))
                added.append(key)
        self.patches_uuid = uuid.uuid4()
        return added

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        with torch.no_grad():
            for key, plist in self.patches.items():
                weight = get_attr(self.model, key)
                if key not in self.backup:  # as Neo: no copy when the offload device holds it already
                    self.backup[key] = weight.detach().to(self.offload_device, copy=False)
                merged = self.backup[key].to(weight.device, torch.float32, copy=True)
                for strength, (down, up, alpha) in plist:
                    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                    delta = up.float().flatten(1) @ down.float().flatten(1)
                    merged += strength * scale * delta.reshape(merged.shape)
                set_attr(self.model, key, merged.to(weight.dtype))
        if device_to is not None:
            self.model.to(device_to)
        self.model.current_weight_patches_uuid = self.patches_uuid
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True) -> None:
        if unpatch_weights:
            for key, weight in self.backup.items():
                set_attr(self.model, key, weight)
            self.backup.clear()
            self.model.current_weight_patches_uuid = None
        if device_to is not None:
            self.model.to(device_to)
