"""Stable Diffusion 1.x, 2.x (epsilon and v) and XL: DDPM-trained UNets with CLIP text encoders.

Everything the rest of the code must know of these three families is here or in the ``sd_*``
modules beside this one: detection (:mod:`.sd_detect`), text conditioning (:mod:`.sd_text`),
tiny models (:mod:`.sd_tiny`). Loading reuses the diffusers-part loaders of ``models/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.families import sd_detect, sd_text, sd_tiny
from lora_trainer.families.base import Family, ObjectiveSpec

if TYPE_CHECKING:
    import torch

    from lora_trainer.config import ModelConfig
    from lora_trainer.models.bundle import ModelBundle

IMPL_SGM = "https://github.com/Stability-AI/generative-models"
EOS = "<|endoftext|>"
# SD1/SD2 keys in kohya files (diffusers UNet paths, one text encoder); SD2's look like SD1's.
_SD_UNET_KEYS = ("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_", "lora_te_")
_SDXL_KEYS = ("lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_")


class _StableDiffusion(Family):
    kohya_blocks = (12, 1, False)  # 12 down, the mid block, 12 up, by diffusers names
    objective = ObjectiveSpec(kind="ddpm")
    pipeline_class = "StableDiffusionPipeline"
    text_encoder_folders = (("te", "text_encoder", "tokenizer"),)
    tokenizer_pads = (("tokenizer", EOS),)
    unet_topology = (4, (0, 1, 2))
    kohya_unet_naming = "diffusers"
    lora_te_prefixes = ("lora_te_",)
    lora_keys_label = "sd1/sd2"
    webui_trainable = True
    # The tiny model's text encoder: (transformers class, activation) per subfolder.
    tiny_encoders: dict[str, tuple[str, str]] = {"text_encoder": ("CLIPTextModel", "quick_gelu")}
    tiny_vae_scaling = 0.18215

    # -- detection ----------------------------------------------------------------------
    def matches_state_dict(self, keys: set[str], state_dict: dict[str, Any]) -> bool:
        from lora_trainer.errors import ModelLoadError

        try:
            return sd_detect.detect_arch(state_dict) == self.name
        except ModelLoadError:
            return False

    def matches_folder(self, path: Path, index: dict[str, Any]) -> bool:
        # Another pipeline is another family's; a broken SD folder fails here with its own message.
        return sd_detect.folder_arch(path, index) == self.name

    # -- loading ------------------------------------------------------------------------
    def load_folder(self, path: Path, model_cfg: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> ModelBundle:
        from lora_trainer.models.loaders import load_diffusers_folder

        return load_diffusers_folder(path, self, model_cfg, device, dtype)

    def load_single_file(self, path: Path, state_dict: dict[str, Any], model_cfg: ModelConfig,
                         device: torch.device, dtype: torch.dtype,
                         config_folder: Path | None = None) -> ModelBundle:
        from lora_trainer.models.loaders import load_sd_single_file

        return load_sd_single_file(path, state_dict, self, model_cfg, device, dtype,
                                   config_folder=config_folder)

    # -- parts --------------------------------------------------------------------------
    def native_resolution(self, prediction_type: str) -> int:
        return 768 if prediction_type == "v_prediction" else 512  # the v models are the 768 ones

    def make_encode_text(self, encoders: list[Any], tokenizers: list[Any], device: torch.device,
                         weighted: bool = False, chunks: int = 1) -> Any:
        return sd_text.encode_last_hidden(encoders, tokenizers, device, weighted, chunks)

    def tiny_unet_config(self) -> dict[str, Any]:
        return sd_tiny.unet_config_sd(v2=False)

    def tiny_vae_config(self) -> dict[str, Any]:
        return sd_tiny.vae_config(self.tiny_vae_scaling)

    def tiny_components(self, seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
        return sd_tiny.components(self, seed, prediction_type, self.tiny_encoders)

    def render_pipeline_kwargs(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    # -- LoRA files ---------------------------------------------------------------------
    def matches_lora_keys(self, keys: set[str]) -> bool:
        return any(k.startswith(_SD_UNET_KEYS) for k in keys)


class SD1(_StableDiffusion):
    name, label = "sd1", "Stable Diffusion 1.x"
    default_resolution = 512
    text_encoder_params = 123_060_480
    # A1111, Forge and ComfyUI all read lora_te1_ as the SD1 text encoder too.
    lora_te_prefixes = ("lora_te_", "lora_te1_")
    webui_flag, a1111_version_label = "is_sd1", "SD1"

    def matches_lora_metadata(self, metadata: dict[str, str]) -> bool:
        return (metadata.get("ss_base_model_version", "").startswith("sd_v1")
                or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v1"))

    def matches_webui_model(self, sd_model: Any) -> bool:
        return True  # the LDM model that is neither SDXL's nor SD2's

    def a1111_shows(self, metadata: dict[str, str]) -> bool:
        return True  # A1111: any metadata that says neither SDXL nor SD2 is SD1

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v1"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-v1/lora"


class SD2(_StableDiffusion):
    name, label = "sd2", "Stable Diffusion 2.x"
    default_resolution = 768
    text_encoder_params = 340_387_840
    clip_caption_model = "ViT-H-14/laion2b_s32b_b79k"
    tokenizer_pads = (("tokenizer", "!"),)
    kohya_v2 = True
    webui_flag, a1111_version_label = "is_sd2", "SD2"
    tiny_encoders = {"text_encoder": ("CLIPTextModel", "gelu")}

    def matches_lora_keys(self, keys: set[str]) -> bool:
        return False  # SD2's keys are SD1's: only metadata tells them apart

    def matches_lora_metadata(self, metadata: dict[str, str]) -> bool:
        return (metadata.get("ss_base_model_version", "").startswith("sd_v2") or metadata.get("ss_v2") == "True"
                or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-v2"))

    def matches_webui_model(self, sd_model: Any) -> bool:
        return hasattr(getattr(sd_model, "cond_stage_model", None), "model")  # open_clip's wrapper

    def a1111_shows(self, metadata: dict[str, str]) -> bool:
        return metadata.get("ss_v2") == "True"

    def config_folder_name(self, prediction_type: str) -> str:
        return "sd2_v" if prediction_type == "v_prediction" else "sd2"

    def single_file_prediction_type(self, path: Path, requested: str) -> str:
        return sd_detect.sd2_prediction_type(path, requested)

    def tiny_unet_config(self) -> dict[str, Any]:
        return sd_tiny.unet_config_sd(v2=True)

    def base_model_version(self, prediction_type: str) -> str:
        return "sd_v2_v" if prediction_type == "v_prediction" else "sd_v2"

    def modelspec_architecture(self, prediction_type: str) -> str:
        if prediction_type == "v_prediction":
            return "stable-diffusion-v2-768-v/lora"
        return "stable-diffusion-v2-512/lora"


class SDXL(_StableDiffusion):
    name, label = "sdxl", "Stable Diffusion XL"
    kohya_blocks = (9, 3, True)  # base, 9 input, 3 middle, 9 output, out
    default_resolution = 1024
    text_encoder_roots = ("te1", "te2")
    trainable_text_encoders = ("te1", "te2")
    uses_size_info = True
    text_encoder_params = 123_060_480 + 694_659_840
    modelspec_implementation = IMPL_SGM
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_folders = (("te1", "text_encoder", "tokenizer"), ("te2", "text_encoder_2", "tokenizer_2"))
    tokenizer_pads = (("tokenizer", EOS), ("tokenizer_2", "!"))
    # SDXL's VAE overflows in fp16 (NaN latents).
    vae_fp32 = True
    unet_topology = (3, (1, 2))
    kohya_unet_naming = "ldm"
    lora_te_prefixes = ("lora_te1_", "lora_te2_")
    lora_keys_label = "sdxl"
    webui_flag, a1111_version_label = "is_sdxl", "SDXL"
    tiny_encoders = {"text_encoder": ("CLIPTextModel", "quick_gelu"),
                     "text_encoder_2": ("CLIPTextModelWithProjection", "gelu")}
    tiny_vae_scaling = 0.13025
    # SDXL needs about twice the memory at 1024 px: checkpointing below 24 GB and smaller batches.
    _PRESETS: dict[int, dict[str, Any]] = {
        6: {"data.resolution": 768, "train.batch_size": 1, "network.rank": 4, "network.alpha": 2.0,
            "train.gradient_checkpointing": True},
        8: {"data.resolution": 1024, "train.batch_size": 1, "network.rank": 8, "network.alpha": 4.0,
            "train.gradient_checkpointing": True},
        12: {"data.resolution": 1024, "train.batch_size": 1, "network.rank": 16, "network.alpha": 8.0,
             "train.gradient_checkpointing": True},
        16: {"data.resolution": 1024, "train.batch_size": 1, "network.rank": 32, "network.alpha": 16.0,
             "train.gradient_checkpointing": True},
        24: {"data.resolution": 1024, "train.batch_size": 2, "network.rank": 32, "network.alpha": 16.0,
             "train.gradient_checkpointing": False},
    }

    def matches_lora_keys(self, keys: set[str]) -> bool:
        # LDM-named UNet keys or lora_te2_; lora_te1_ alone too, unless SD1 keys say it is SD1's.
        return (any(k.startswith(_SDXL_KEYS) for k in keys)
                or (any(k.startswith("lora_te1_") for k in keys) and not super().matches_lora_keys(keys)))

    def matches_lora_metadata(self, metadata: dict[str, str]) -> bool:
        return (metadata.get("ss_base_model_version", "").startswith("sdxl")
                or metadata.get("modelspec.architecture", "").startswith("stable-diffusion-xl"))

    def matches_webui_model(self, sd_model: Any) -> bool:
        return hasattr(sd_model, "conditioner")  # sgm's DiffusionEngine

    def a1111_shows(self, metadata: dict[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("sdxl_")

    def make_encode_text(self, encoders: list[Any], tokenizers: list[Any], device: torch.device,
                         weighted: bool = False, chunks: int = 1) -> Any:
        return sd_text.encode_sdxl(encoders, tokenizers, device, weighted, chunks)

    def tiny_unet_config(self) -> dict[str, Any]:
        return sd_tiny.unet_config_sdxl()

    def native_resolution(self, prediction_type: str) -> int:
        return self.default_resolution

    def render_pipeline_kwargs(self) -> dict[str, Any]:
        return {}

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        try:
            return dict(self._PRESETS[int(preset.split()[0])])
        except (ValueError, KeyError, IndexError):
            return {}

    def base_model_version(self, prediction_type: str) -> str:
        return "sdxl_base_v1-0"

    def modelspec_architecture(self, prediction_type: str) -> str:
        return "stable-diffusion-xl-v1-base/lora"
