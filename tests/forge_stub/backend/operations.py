"""Stand-in for ``backend/operations.py``: Forge's layers with ``parameters_manual_cast``, which
cast their stored weight and bias to the input's dtype and device at every call (Forge's loader
builds the UNet with them when its storage dtype differs from its computation dtype). Written
for the tests; ``manual_cast`` gives an LDM UNet's layers that behaviour."""

import functools

import torch
import torch.nn.functional as F


def _cast(t, x):
    return None if t is None else t.to(x.device, x.dtype)


def _forward(self, x):
    weight, bias = _cast(self.weight, x), _cast(self.bias, x)
    if isinstance(self, torch.nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(self, torch.nn.GroupNorm):
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)
    if isinstance(self, torch.nn.LayerNorm):
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
    return self._conv_forward(x, weight, bias)


@functools.cache
def _manual_cast_class(base: type) -> type:
    return type(base.__name__, (base,), {"forward": _forward, "parameters_manual_cast": True})


def manual_cast(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)):
            m.__class__ = _manual_cast_class(type(m))
    return model
