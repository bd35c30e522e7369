"""Stable Diffusion 1.x, 2.x (epsilon and v) and XL: DDPM-trained UNets with CLIP text encoders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.families.base import Family, ObjectiveSpec

if TYPE_CHECKING:
    import torch

    from lora_trainer.config import ModelConfig
    from lora_trainer.models.bundle import ModelBundle

IMPL_SGM = "https://github.com/Stability-AI/generative-models"


class _StableDiffusion(Family):
    objective = ObjectiveSpec(kind="ddpm")

    def matches_state_dict(self, keys: set[str], state_dict: dict[str, Any]) -> bool:
        from lora_trainer.errors import ModelLoadError
        from lora_trainer.models.checkpoint import detect_arch

        try:
            return detect_arch(state_dict) == self.name
        except ModelLoadError:
            return False

    def matches_folder(self, path: Path, index: dict[str, Any]) -> bool:
        from lora_trainer.models.loaders import PIPELINE_ARCH, _folder_arch

        # Another pipeline is another family's; a broken SD folder fails here with its own message.
        return index.get("_class_name") in PIPELINE_ARCH and _folder_arch(path, index) == self.name

    def load_folder(self, path: Path, model_cfg: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> ModelBundle:
        from lora_trainer.models.loaders import load_diffusers_folder

        return load_diffusers_folder(path, model_cfg, device, dtype)

    def load_single_file(self, path: Path, state_dict: dict[str, Any], model_cfg: ModelConfig,
                         device: torch.device, dtype: torch.dtype,
                         config_folder: Path | None = None) -> ModelBundle:
        from lora_trainer.models.loaders import load_sd_single_file

        return load_sd_single_file(path, state_dict, self.name, model_cfg, device, dtype,
                                   config_folder=config_folder)


class SD1(_StableDiffusion):
    name, label = "sd1", "Stable Diffusion 1.x"
    default_resolution = 512
    text_encoder_params = 123_060_480

    def matches_lora(self, keys: set[str], metadata: dict[str, str]) -> bool:
        version = metadata.get("ss_base_model_version", "")
        spec = metadata.get("modelspec.architecture", "")
        if version or spec:
            return version.startswith("sd_v1") or spec.startswith("stable-diffusion-v1")
        return any(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                                 "lora_te_")) for k in keys)

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v1"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1/lora"


class SD2(_StableDiffusion):
    name, label = "sd2", "Stable Diffusion 2.x"
    default_resolution = 768
    text_encoder_params = 340_387_840
    clip_caption_model = "ViT-H-14/laion2b_s32b_b79k"

    def matches_lora(self, keys: set[str], metadata: dict[str, str]) -> bool:
        return (metadata.get("ss_base_model_version", "").startswith("sd_v2") or metadata.get("ss_v2") == "True"
                or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2"))

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        if prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v/lora"
        return "stable-diffusion-v2-512/lora"


class SDXL(_StableDiffusion):
    name, label = "sdxl", "Stable Diffusion XL"
    default_resolution = 1024
    text_encoder_roots = ("te1", "te2")
    trainable_text_encoders = ("te1", "te2")
    uses_size_info = True
    text_encoder_params = 123_060_480 + 694_659_840
    modelspec_implementation = IMPL_SGM

    def matches_lora(self, keys: set[str], metadata: dict[str, str]) -> bool:
        version = metadata.get("ss_base_model_version", "")
        spec = metadata.get("modelspec.architecture", "")
        if version or spec:
            return version.startswith("sdxl") or spec.startswith("stable-diffusion-xl")
        return any(k.startswith(("lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in keys)

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base/lora"
