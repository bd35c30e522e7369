"""Stand-in for ``backend/patcher/unet.py``: the UNet's patcher (``forge_objects.unet``)."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    pass
