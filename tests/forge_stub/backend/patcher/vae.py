"""Stand-in for ``backend/patcher/vae.py``: the VAE, loaded through the memory manager to encode/decode."""

from backend import memory_management
from backend.patcher.base import ModelPatcher


class VAE:
    def __init__(self, model) -> None:
        self.first_stage_model = model
        self.patcher = ModelPatcher(model, "cpu", "cpu")

    def encode(self, pixels):
        memory_management.load_model_gpu(self.patcher)
        return self.first_stage_model.encode(pixels).sample()

    def decode(self, latents):
        memory_management.load_model_gpu(self.patcher)
        return self.first_stage_model.decode(latents)
