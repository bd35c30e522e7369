"""ModelBundle: everything the trainer needs from a Stable Diffusion model, and nothing else.

The trainer sees a bundle, never a WebUI or a pipeline. Loaders (diffusers folder, single file,
demo) and hosts (the A1111 WebUI's live ``shared.sd_model``) build one; the per-architecture
callables hide the difference between diffusers and LDM/SGM model classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from lora_trainer.families.base import Family, ObjectiveSpec

# The family's name (lora_trainer.families): "sd1", "sd2", "sdxl", ...
Arch = str
PredictionType = Literal["epsilon", "v_prediction", "flow"]
# How module paths inside a trainable root are spelled; the kohya converter reads this.
UnetNaming = Literal["diffusers", "ldm"]
TextEncoderNaming = Literal["hf_clip", "open_clip"]

# Conditioning produced by ``encode_text``: "context" (B, T, C) always; SDXL adds "pooled" (B, 1280).
Conditioning = dict[str, torch.Tensor]


@dataclass
class TextEncoderPart:
    """One text encoder. ``key`` is its kohya prefix part: "te" (SD1/SD2), "te1"/"te2" (SDXL)."""

    key: str
    module: nn.Module
    naming: TextEncoderNaming


@dataclass
class ModelBundle:
    arch: Arch
    prediction_type: PredictionType
    unet: nn.Module
    unet_naming: UnetNaming
    text_encoders: list[TextEncoderPart]
    vae: nn.Module | None
    # Cumulative product of alphas of the training noise schedule, shape (num_train_timesteps,).
    alphas_cumprod: torch.Tensor
    # pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8)
    encode_images: Callable[[torch.Tensor], torch.Tensor]
    # captions -> conditioning; runs with grad when a text encoder is trained
    encode_text: Callable[[list[str]], Conditioning]
    # (noisy latents, timesteps (B,), conditioning, size_info (B, 6) or None) -> model output.
    # size_info rows are [orig_h, orig_w, crop_top, crop_left, target_h, target_w] (SDXL only).
    predict: Callable[[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor | None], torch.Tensor]
    # latents -> pixels in [-1, 1]; used for sample images
    decode_latents: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "model"
    model_hash: str | None = None  # sha256 of the checkpoint file when known (ss_new_sd_model_hash)
    legacy_hash: str | None = None  # A1111's short hash (ss_sd_model_hash) when known
    default_resolution: int = 512
    latent_channels: int = 4
    vae_scale_factor: int = 8
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # Free-form extras a loader or host wants to keep (tokenizers, pipeline pieces, ...).
    extras: dict[str, Any] = field(default_factory=dict)
    # The training objective when it differs from the family's (None: the family's).
    objective: ObjectiveSpec | None = None
    # captions read with the WebUI's emphasis syntax ("(word:1.2)", data.weighted_captions) ->
    # conditioning as encode_text's, which reads them as plain text; None: not available
    encode_weighted: Callable[[list[str]], Conditioning] | None = None
    # (weighted, chunks) -> an encoder as encode_text / encode_weighted of captions of up to
    # 75 x chunks tokens (data.max_token_length); None: the host reads long captions itself (a
    # WebUI) or the family has its own length
    make_encoder: Callable[[bool, int], Callable[[list[str]], Conditioning]] | None = None
    # The dtype LoHa/LoKr files must be written in for the host's own loader to apply them, when
    # output.save_precision's fp16 would not do (A1111 on the CPU multiplies their factors in the
    # file's dtype, and torch has no fp16 matrix product there); None: any.
    lycoris_save_dtype: torch.dtype | None = None

    @property
    def family(self) -> Family:
        from lora_trainer.families import get_family

        return get_family(self.arch)

    @property
    def objective_spec(self) -> ObjectiveSpec:
        return self.objective if self.objective is not None else self.family.objective

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def trainable_roots(self) -> dict[str, nn.Module]:
        """{"unet": ..., "te"/"te1"/"te2": ...}: the modules LoRA can be injected into (the
        family's trainable text encoders: never T5)."""
        from lora_trainer.families import family_names

        roots: dict[str, nn.Module] = {"unet": self.unet}
        trainable = self.family.trainable_text_encoders if self.arch in family_names() else None
        for part in self.text_encoders:
            if trainable is None or part.key in trainable:
                roots[part.key] = part.module
        return roots

    def naming_of(self, root: str) -> str:
        if root == "unet":
            return self.unet_naming
        for part in self.text_encoders:
            if part.key == root:
                return part.naming
        raise KeyError(root)
