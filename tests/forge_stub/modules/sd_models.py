"""Stand-in for Forge Neo's ``modules/sd_models.py``: the selected checkpoint is loaded on first
use. ``model_data.forge_loading_parameters`` names it (here with a ``factory`` building the tiny
engine, called under inference mode as Neo loads); ``forge_model_reload`` loads it unless it is
the one loaded (``forge_hash``)."""

import torch
from backend import memory_management

from modules import shared


class FakeInitialModel:
    """What ``shared.sd_model`` is before the first generation."""

    first_stage_model = None
    cond_stage_model = None


class SdModelData:
    def __init__(self) -> None:
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters: dict = {}
        self.forge_hash = ""


model_data = SdModelData()
loads: list[str] = []  # test aid: checkpoints loaded


def select(checkpoint_name: str, factory) -> None:
    """What choosing a checkpoint in the dropdown does (test helper): remembered, not loaded."""
    model_data.forge_loading_parameters = {"checkpoint_info": checkpoint_name, "factory": factory}


@torch.inference_mode()  # as Neo: every tensor of a loaded checkpoint is an inference tensor
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters.get("checkpoint_info"))
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    memory_management.unload_all_models()
    factory = model_data.forge_loading_parameters.get("factory")
    if factory is None:
        raise ValueError("Failed to find available model...")
    model_data.sd_model = factory()
    loads.append(current_hash)
    shared.sd_model = model_data.sd_model
    model_data.forge_hash = current_hash
    return model_data.sd_model, True
