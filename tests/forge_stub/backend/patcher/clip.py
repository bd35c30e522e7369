"""Stand-in for ``backend/patcher/clip.py``: ``CLIP`` holds the text encoders and their patcher."""

import copy

from torch import nn

from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, model_dict: dict, tokenizer_dict: dict) -> None:
        self.cond_stage_model = nn.ModuleDict(model_dict)
        self.tokenizer = tokenizer_dict
        self.patcher = ModelPatcher(self.cond_stage_model, "cpu", "cpu")

    def clone(self):
        n = copy.copy(self)  # same text encoders, a patcher clone for other patches
        n.patcher = self.patcher.clone()
        return n

    def add_patches(self, **kwargs):
        return self.patcher.add_patches(**kwargs)
