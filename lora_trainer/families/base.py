"""What a model family is: one object that answers every family question the rest of the code asks.

A family (SD1, SD2, SDXL, Flux.1, SD3.5, ...) is a :class:`Family` subclass registered in
:mod:`lora_trainer.families`. Other modules never test a family's name; they ask the family:

- **detection**: does a diffusers folder, an original-layout state dict or a LoRA file belong to it;
- **loading**: its parts from a folder or a single file, offline, into a ``ModelBundle``;
- **objective**: how it is trained (:class:`ObjectiveSpec`: DDPM noise schedule with an epsilon
  or v target, or rectified flow with its timestep sampling and shift) and sampled;
- **LoRA**: the roots LoRA goes into, their file-key prefixes and naming;
- **metadata**: ``ss_base_model_version`` and ``modelspec.architecture``;
- **presets and memory**: native resolution, preset overrides, parameter counts of the parts the
  memory estimate must count when they stay resident.

This module imports nothing of the rest of the package at import time, so every package may ask
a family (the layering test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from lora_trainer.config import ModelConfig
    from lora_trainer.models.bundle import ModelBundle

ObjectiveKind = Literal["ddpm", "flow"]
TimestepSampling = Literal["uniform", "logit_normal", "sigmoid"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """How a family is trained and sampled; read by ``train/objectives.py``.

    ``ddpm``: integer timesteps drawn uniformly from the bundle's ``alphas_cumprod`` schedule,
    target epsilon or v (the bundle's ``prediction_type``), min-SNR weighting available.

    ``flow`` (rectified flow, SD3/Flux): sigma in (0, 1) drawn by ``sampling`` (logit-normal with
    ``logit_mean``/``logit_std``; "sigmoid" is logit-normal with std ``sigmoid_scale``), then
    shifted: with ``resolution_shift`` by the image's token count (Flux:
    mu = base_shift .. max_shift over 256 .. 4096 tokens), else by ``shift`` (SD3: 3.0);
    noisy = (1 - sigma) x0 + sigma noise, target = noise - x0. ``predict`` gets sigma as the
    timestep and scales it as the model wants.
    """

    kind: ObjectiveKind = "ddpm"
    sampling: TimestepSampling = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0
    shift: float = 1.0
    resolution_shift: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    # Flux.1-dev takes the guidance strength as an input (distilled guidance): no CFG pass when
    # sampling, and a fixed guidance value while training.
    guidance_input: bool = False
    # Samples use classifier-free guidance (two passes per step): SD1/SD2/SDXL/SD3.
    cfg_sampling: bool = True
    # The guidance value a guidance-input model is given while training (kohya's and diffusers'
    # Flux default: 3.5).
    train_guidance: float = 1.0


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: str = ""  # "sd1", "sd2", "sdxl", "flux1", "sd3" (config's model.arch, bundle.arch)
    label: str = ""  # "Stable Diffusion 1.x" (what the tab and errors show)
    default_resolution: int = 512
    # kohya's UNet blocks for block weights and ranks (lora_trainer.lora.blocks): (blocks per side,
    # mid blocks, whether its kohya names are SGM paths with a base and an out block); None: none.
    kohya_blocks: tuple[int, int, bool] | None = None
    # LoRA roots: the denoiser's key and the text encoders' keys, in the bundle's order.
    denoiser_root: str = "unet"
    text_encoder_roots: tuple[str, ...] = ("te",)
    # Text encoders LoRA may be trained on (T5 is never trained: too large to be worth it).
    trainable_text_encoders: tuple[str, ...] = ("te",)
    # The denoiser takes SDXL's size/crop conditioning (batch.size_info).
    uses_size_info: bool = False
    latent_channels: int = 4
    objective: ObjectiveSpec = ObjectiveSpec()
    # The guidance of sample and test images: a CFG scale, or Flux.1-dev's distilled guidance.
    sample_guidance: float = 7.0
    # Memory model: parameters of the parts that stay resident when not cached or offloaded.
    text_encoder_params: int = 0
    vae_params: int = 83_653_863
    # open_clip model the CLIP interrogator uses for "auto" on this family.
    clip_caption_model: str = "ViT-L-14/openai"
    # -- diffusers parts (the loaders, the tiny models and the standalone renderer read these) --
    # The diffusers pipeline class of the family's folders and renders ("StableDiffusionPipeline").
    pipeline_class: str = ""
    # (LoRA root, text encoder subfolder, tokenizer subfolder) per text encoder, in bundle order.
    text_encoder_folders: tuple[tuple[str, str, str], ...] = ()
    # (tokenizer subfolder, pad token) per tokenizer: OpenCLIP's pad with "!", OpenAI's CLIP with EOS.
    tokenizer_pads: tuple[tuple[str, str], ...] = ()
    # The VAE overflows in fp16 (SDXL's): keep it in fp32 whatever the weight dtype.
    vae_fp32: bool = False
    # -- kohya files (lora/kohya.py, lora/layout.py, inspect) --------------------------------
    # UNet families: (number of levels, levels with attention), 2 res blocks per level; None: no
    # kohya UNet table (the family names its keys itself through ``lora_key``).
    unet_topology: tuple[int, tuple[int, ...]] | None = None
    # The UNet module naming kohya files use: "diffusers" paths or "ldm" (SGM) paths.
    kohya_unet_naming: str = "diffusers"
    # Text-encoder key prefixes the loaders read for this family (the first is the one written).
    lora_te_prefixes: tuple[str, ...] = ()
    # How ``inspect`` names the family a file's keys point to ("sd1/sd2": their keys are alike).
    lora_keys_label: str = ""
    # kohya's ``ss_v2`` ("True" for SD2 files; A1111 shows those as SD2).
    kohya_v2: bool = False
    # -- WebUIs -------------------------------------------------------------------------
    # The flag the A1111/Forge model object sets for this family (``sd_model.is_sdxl``).
    webui_flag: str = ""
    # A WebUI host can train the loaded model of this family in place (hosts/a1111_bundle.py).
    webui_trainable: bool = False
    # What A1111 v1.10.1 shows on a LoRA card of this family ("" when it has no label for it).
    a1111_version_label: str = ""

    # -- detection ----------------------------------------------------------------------
    def matches_state_dict(self, keys: set[str], state_dict: dict[str, Any]) -> bool:
        """Whether an original-layout (single-file) state dict is a model of this family."""
        return False

    def matches_folder(self, path: Path, index: dict[str, Any]) -> bool:
        """Whether a diffusers folder (its model_index.json as ``index``) is of this family."""
        return False

    def matches_lora(self, keys: set[str], metadata: dict[str, str]) -> bool:
        """Whether a LoRA file's module keys say it was made for this family (asked after every
        family's :meth:`matches_lora_metadata` said no)."""
        return self.matches_lora_keys(keys)

    def matches_lora_metadata(self, metadata: dict[str, str]) -> bool:
        """Whether a LoRA file's metadata (``ss_base_model_version``, ``modelspec.architecture``)
        names this family."""
        return False

    def matches_lora_keys(self, keys: set[str]) -> bool:
        """Whether a LoRA file's module keys (no tensor suffix) are this family's."""
        return False

    def matches_webui_model(self, sd_model: Any) -> bool:
        """Whether a WebUI model object without family flags is this family (by its parts)."""
        return False

    # -- loading ------------------------------------------------------------------------
    def load_folder(self, path: Path, model_cfg: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> ModelBundle:
        raise NotImplementedError(f"{self.label}: loading a diffusers folder is not supported")

    def load_single_file(self, path: Path, state_dict: dict[str, Any], model_cfg: ModelConfig,
                         device: torch.device, dtype: torch.dtype,
                         config_folder: Path | None = None) -> ModelBundle:
        raise NotImplementedError(f"{self.label}: loading a single-file checkpoint is not supported")

    # -- LoRA ---------------------------------------------------------------------------
    def lora_key(self, root: str, naming: str, path: str, part: str = "") -> str | None:
        """The file key (no tensor suffix) of module ``path`` in LoRA root ``root``; None means
        kohya's Stable Diffusion naming (:func:`lora_trainer.lora.kohya.kohya_name`). Raise
        ``LoraFormatError`` for a module that has no name in this family's files."""
        return None

    def default_targets(self, root: str, module: Any, naming: str) -> list[str] | None:
        """Module paths LoRA goes into by default in ``root``; None means kohya's SD defaults."""
        return None

    def known_lora_key(self, key: str) -> bool | None:
        """Whether a LoRA file's module key (no tensor suffix) names a module of this family's
        models; None means kohya's Stable Diffusion check (``unet_topology``, ``lora_te_prefixes``)."""
        return None

    def lora_shapes(self, size: str) -> dict[str, tuple[int, ...]] | None:
        """{module key: weight shape} of every layer a LoRA file may adapt, for the full-size
        (``size`` "full") or tiny models; None means the Stable Diffusion layout built from the
        packaged configs (:mod:`lora_trainer.lora.layout`)."""
        return None

    def a1111_shows(self, metadata: dict[str, str]) -> bool:
        """Whether A1111 v1.10.1 shows this family's ``a1111_version_label`` for a LoRA file with
        ``metadata`` (asked in registry order; it knows SD1, SD2 and SDXL only)."""
        return False

    # -- parts ----------------------------------------------------------------------------
    def native_resolution(self, prediction_type: str) -> int:
        """The resolution the family's models were trained at (SD2: 768 for v, 512 for epsilon)."""
        return self.default_resolution

    def config_folder_name(self, prediction_type: str) -> str:
        """The packaged config folder (``models/configs/<name>``) of a single-file checkpoint."""
        return self.name

    def single_file_prediction_type(self, path: Path, requested: str) -> str:
        """What a single-file checkpoint predicts: ``requested`` unless "auto"."""
        return "epsilon" if requested == "auto" else requested

    def make_encode_text(self, encoders: list[Any], tokenizers: list[Any],
                         device: torch.device, weighted: bool = False, chunks: int = 1) -> Any:
        """``encode_text`` (captions -> conditioning) over the family's diffusers text encoders;
        ``weighted``: captions read with the WebUI's emphasis syntax (``ModelBundle.encode_weighted``);
        ``chunks``: captions of up to that many chunks of 75 tokens (``ModelBundle.make_encoder``)."""
        raise NotImplementedError(f"{self.label}: no text encoding for diffusers parts")

    def tiny_unet_config(self) -> dict[str, Any]:
        """The denoiser config of the family's tiny test model (real topology, small widths)."""
        raise NotImplementedError(f"{self.label}: no tiny model")

    def tiny_vae_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{self.label}: no tiny model")

    def tiny_components(self, seed: int = 0, prediction_type: str = "epsilon") -> dict[str, Any]:
        """The diffusers parts of the family's tiny model, randomly initialised with ``seed``."""
        raise NotImplementedError(f"{self.label}: no tiny model")

    def render_pipeline_kwargs(self) -> dict[str, Any]:
        """Extra arguments of ``pipeline_class`` beyond the model parts (SD1/SD2's safety checker)."""
        return {}

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The trained modules' tensors (keys from :meth:`lora_key`) -> the tensors the file holds.
        The same unless the family's file layers fuse or reorder modules (Flux/SD3: q/k/v in one
        layer, see :mod:`lora_trainer.families.flow_lora`). Never modifies its input."""
        return tensors

    def fused_file_layer(self, key: str) -> str | None:
        """The file layer a trained module (its key from :meth:`lora_key`) shares with other
        modules (Flux/SD3's q/k/v); None when the module is a file layer of its own."""
        return None

    def inspect_report(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any] | None:
        """``inspect``'s report of a file made for this family when the family has its own
        (same shape as :func:`lora_trainer.lora.report.analyse`); None: the Stable Diffusion one."""
        return None

    def module_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`file_tensors`: a file's tensors -> one entry per module key;
        keys that already are module keys pass through unchanged."""
        return tensors

    # -- metadata -----------------------------------------------------------------------
    def base_model_version(self, prediction_type: str) -> str:
        """kohya's ``ss_base_model_version``."""
        raise NotImplementedError

    def modelspec_architecture(self, prediction_type: str) -> str:
        raise NotImplementedError

    modelspec_implementation: str = "diffusers"

    def lora_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        """``ss_base_model_version`` and ``modelspec.architecture`` of a LoRA trained on ``bundle``
        (a family with variants answers per variant)."""
        return {"ss_base_model_version": self.base_model_version(bundle.prediction_type),
                "modelspec.architecture": self.modelspec_architecture(bundle.prediction_type)}

    # Storage precisions of the denoiser's weights a loader accepts in model.weight_dtype besides
    # fp32/fp16/bf16 ("fp8", "nf4"); none for the Stable Diffusion UNets.
    quantized_weights: tuple[str, ...] = ()

    # The denoiser is a diffusers transformer the family builds itself (``meta_denoiser``,
    # ``make_predict``); else a UNet2DConditionModel from the packaged ``unet/config.json``.
    transformer_denoiser: bool = False

    def meta_denoiser(self, variant: str = "", size: str = "full") -> Any:
        """The denoiser of ``variant`` on the meta device, full-size or (``size`` "tiny") the
        tiny test model's (memory estimate), or None when the family does not build it here."""
        return None

    def variants(self) -> tuple[str, ...]:
        """The family's variants ("dev", "schnell"), first the default; none for the UNet families."""
        return ()

    def default_variant(self) -> str:
        """The variant meant when none is named (the first: "dev", "medium"); "" without variants."""
        return next(iter(self.variants()), "")

    def config_folder(self, variant: str = "") -> Path:
        """The packaged config-only folder of the full-size model (``models/configs/<name>``)."""
        return Path(__file__).resolve().parent.parent / "models" / "configs" / self.name

    def text_tokens(self, variant: str = "") -> int:
        """How many text tokens the denoiser attends to per caption (memory estimate)."""
        return 77

    def make_predict(self, denoiser: Any, dtype: torch.dtype) -> Any:
        """The bundle's ``predict`` over ``denoiser`` (what the trainer calls each step), or None
        when the family's bundle is built elsewhere (the Stable Diffusion UNets)."""
        return None

    def text_encoder_bytes(self, weight_dtype: str, compute_bytes: int) -> int:
        """Bytes of the text encoders as stored with ``model.weight_dtype`` (memory estimate)."""
        return self.text_encoder_params * compute_bytes

    # -- presets ------------------------------------------------------------------------
    def preset_overrides(self, preset: str) -> dict[str, Any]:
        """Config values this family changes in a named preset (beyond its resolution)."""
        return {}

    def __repr__(self) -> str:
        return f"<family {self.name}>"
