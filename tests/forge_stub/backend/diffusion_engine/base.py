"""Stand-in for ``backend/diffusion_engine/base.py``: what ``shared.sd_model`` is in Forge Neo.

Not an nn.Module. ``forge_objects`` are the patchers generations use (clones with LoRA patches
after a ``<lora:...>``), ``forge_objects_original`` those without; ``current_lora_hash`` says
which LoRAs ``forge_objects`` carries. Conditioning and VAE run under ``torch.inference_mode``.
"""


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None) -> None:
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    def __init__(self, forge_objects: ForgeObjects) -> None:
        self.forge_objects = forge_objects
        self.forge_objects_original = forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sd1 = False
        self.is_sdxl = False

    @property
    def first_stage_model(self):
        return self.forge_objects.vae.first_stage_model

    @property
    def cond_stage_model(self):
        return self.forge_objects.clip.cond_stage_model

    def get_first_stage_encoding(self, x):
        return x
