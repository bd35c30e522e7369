"""Load a base model into a ModelBundle: the tiny demo model, a diffusers folder, or a single file.

Everything loads offline. Single-file checkpoints are converted by diffusers' own single-file
converters, pointed at config-only folders shipped in this package (``configs/``) so nothing is
fetched from a hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_trainer.config import ModelConfig
from lora_trainer.errors import ModelLoadError
from lora_trainer.models import checkpoint as ckpt
from lora_trainer.models.bundle import ModelBundle
from lora_trainer.models.paths import base_model_path
from lora_trainer.models.setups import bundle_from_diffusers

if TYPE_CHECKING:
    from lora_trainer.families.base import Family

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# CLIP text encoder subfolders; the second one is projected (SDXL's OpenCLIP-bigG).
CLIP_TEXT_FOLDERS = ("text_encoder", "text_encoder_2")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' is the first CUDA device, then Apple's MPS, then the CPU."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"model.device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_mixed_precision(name: str, device: torch.device,
                            host_compute_dtype: str | torch.dtype | None = None) -> str:
    """``train.mixed_precision`` as a run trains: "auto" is the precision a host's model computes
    in (a WebUI's: fp16 or bf16 autocast, "no" for an fp32 model), else bf16 on a CUDA GPU that
    has it, fp16 on other CUDA GPUs and "no" elsewhere (CPU, Apple GPU); any other value as it is."""
    if name != "auto":
        return name
    if isinstance(host_compute_dtype, torch.dtype):
        host_compute_dtype = next((k for k, v in DTYPES.items() if v == host_compute_dtype), None)
    if host_compute_dtype in ("fp16", "bf16"):
        return host_compute_dtype
    if host_compute_dtype == "fp32":
        return "no"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_dtype(name: str | torch.dtype | None, device: torch.device, mixed_precision: str = "no") -> torch.dtype:
    """'auto' is fp32 on the CPU; on a GPU bf16 when training in bf16, else fp16."""
    if isinstance(name, torch.dtype):
        return name
    if name in ("fp8", "nf4"):  # storage of the denoiser's weights; computed in the auto dtype
        name = "auto"
    if name in (None, "", "auto"):
        if device.type not in ("cuda", "mps"):
            return torch.float32
        return torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    if name not in DTYPES:
        raise ModelLoadError(f"model.weight_dtype {name!r} is unknown; use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def load_bundle(model_cfg: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | str | None = None,
                *, config_folder: str | Path | None = None) -> ModelBundle:
    """The model named by ``model_cfg.base_model`` as a ModelBundle on ``device`` in ``dtype``.

    ``device``/``dtype`` None take ``model_cfg.device``/``weight_dtype``. ``config_folder``
    replaces the packaged config folder of a single-file checkpoint (tests use tiny configs).
    """
    device = resolve_device(device if device is not None else model_cfg.device)
    dtype = resolve_dtype(dtype if dtype is not None else model_cfg.weight_dtype, device)
    base = (model_cfg.base_model or "").strip()
    path = base_model_path(base)
    if path is None:
        bundle = load_demo(model_cfg, device, dtype)
    elif path.is_dir():
        bundle = folder_family(path).load_folder(path, model_cfg, device, dtype)
    else:
        bundle = load_single_file(path, model_cfg, device, dtype, config_folder=config_folder)
    if model_cfg.weight_dtype in ("fp8", "nf4") and model_cfg.weight_dtype not in bundle.family.quantized_weights:
        raise ModelLoadError(f"model.weight_dtype {model_cfg.weight_dtype}: {bundle.family.label} models load in "
                             "fp32/fp16/bf16 only; use auto")
    if model_cfg.arch not in ("auto", bundle.arch):
        raise ModelLoadError(f"model.arch is {model_cfg.arch} but {base} is an {bundle.arch} model; "
                             "set model.arch to auto or to the right family")
    return bundle


def load_demo(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ModelBundle:
    """The tiny embedded SD1-topology model that draws the demo shapes (weights shipped in the package)."""
    from lora_trainer.models import demo_base

    prediction = model_cfg.prediction_type if model_cfg.prediction_type != "auto" else "epsilon"
    if prediction != "epsilon":
        raise ModelLoadError(f"model.prediction_type {prediction!r}: the demo model predicts noise; use auto or epsilon")
    parts = demo_base.load_components()
    bundle = bundle_from_diffusers(parts, demo_base.FAMILY, prediction, device, dtype, name="demo",
                                   default_resolution=demo_base.RESOLUTION)
    bundle.model_hash = bundle.legacy_hash = None
    return bundle


def _read_index(path: Path) -> dict[str, Any]:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{path}: not a diffusers model folder (no model_index.json)")
    try:
        return json.loads(index_file.read_text())
    except ValueError:
        raise ModelLoadError(f"{path}: model_index.json is not valid JSON; re-download or re-save the model") from None


def folder_family(path: Path) -> Family:
    from lora_trainer.families import detect_folder

    return detect_folder(path, _read_index(path))


def _clip_text_class(subfolder: str) -> type:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if subfolder == "text_encoder_2" else CLIPTextModel


def _load_tokenizer(path: Path, sub: str, pad: str) -> Any:
    from transformers import CLIPTokenizer

    if (path / sub / "vocab.json").is_file() or (path / sub / "tokenizer.json").is_file():
        return CLIPTokenizer.from_pretrained(str(path / sub), local_files_only=True)
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    log.info("%s has no %s files; using the built-in CLIP tokenizer", path, sub)
    return load_clip_tokenizer(pad_token=pad)


def load_diffusers_folder(path: Path, family: Family, model_cfg: ModelConfig, device: torch.device,
                          dtype: torch.dtype) -> ModelBundle:
    """A diffusers pipeline folder of a UNet family with CLIP text encoders (model_index.json +
    component subfolders), local files only."""
    import diffusers

    index = _read_index(path)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    vae_dtype = _vae_dtype(family, dtype)
    try:
        parts: dict[str, Any] = {
            "unet": diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
            "vae": diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype,
                                                           local_files_only=True),
        }
        for _, sub, _ in family.text_encoder_folders:
            parts[sub] = _clip_text_class(sub).from_pretrained(path, subfolder=sub, **kw)
        sched_cls = getattr(diffusers, index.get("scheduler", [None, "DDPMScheduler"])[1], diffusers.DDPMScheduler)
        parts["scheduler"] = sched_cls.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers model ({exc})") from None
    for sub, pad in family.tokenizer_pads:
        parts[sub] = _load_tokenizer(path, sub, pad)
    _maybe_replace_vae(parts, model_cfg, family, dtype)
    prediction = None if model_cfg.prediction_type == "auto" else model_cfg.prediction_type
    return bundle_from_diffusers(parts, family.name, prediction, device, dtype, name=path.name)


def _parts_from_state_dict(sd: dict[str, torch.Tensor], family: Family, folder: Path, dtype: torch.dtype,
                           skip_vae: bool) -> dict[str, Any]:
    """diffusers components from an original-layout state dict, configured by ``folder``."""
    import diffusers

    index = json.loads((folder / "model_index.json").read_text())
    kw = dict(config=str(folder), torch_dtype=dtype, local_files_only=True)
    parts: dict[str, Any] = {"unet": diffusers.UNet2DConditionModel.from_single_file(sd, subfolder="unet", **kw)}
    if not skip_vae:
        vae_kw = {**kw, "torch_dtype": _vae_dtype(family, dtype)}
        parts["vae"] = diffusers.AutoencoderKL.from_single_file(sd, subfolder="vae", **vae_kw)
    parts.update(text_encoders_from_state_dict(sd, family.name, folder, dtype))
    sched_cls = getattr(diffusers, index["scheduler"][1])
    parts["scheduler"] = sched_cls.from_pretrained(str(folder), subfolder="scheduler")
    return parts


def text_encoders_from_state_dict(sd: dict[str, torch.Tensor], arch: str, folder: Path,
                                  dtype: torch.dtype) -> dict[str, Any]:
    """Text encoder(s) and tokenizer(s) from an original-layout state dict (CLIP-L and/or OpenCLIP)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTokenizer

    from lora_trainer.families import get_family

    index = json.loads((folder / "model_index.json").read_text())
    parts: dict[str, Any] = {}
    for sub in CLIP_TEXT_FOLDERS:
        if sub in index:
            parts[sub] = create_diffusers_clip_model_from_ldm(_clip_text_class(sub), sd, subfolder=sub,
                                                              config=str(folder), torch_dtype=dtype,
                                                              local_files_only=True)
    for sub, _ in get_family(arch).tokenizer_pads:
        parts[sub] = CLIPTokenizer.from_pretrained(str(folder / sub), local_files_only=True)
    return parts


def load_single_file(path: Path, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                     *, config_folder: str | Path | None = None) -> ModelBundle:
    """A single-file checkpoint of any family (detected from its keys)."""
    from lora_trainer.families import detect_state_dict

    state_dict = ckpt.read_state_dict(path, model_cfg.allow_pickle)
    family = detect_state_dict(state_dict, str(path))
    folder = Path(config_folder) if config_folder is not None else None
    return family.load_single_file(path, state_dict, model_cfg, device, dtype, config_folder=folder)


def load_sd_single_file(path: Path, state_dict: dict[str, torch.Tensor], family: Family, model_cfg: ModelConfig,
                        device: torch.device, dtype: torch.dtype,
                        *, config_folder: str | Path | None = None) -> ModelBundle:
    """A WebUI-style checkpoint of a UNet family with CLIP text encoders (SD1.x, SD2.x epsilon or v,
    SDXL base), converted by diffusers with the family's packaged config folder."""
    prediction = family.single_file_prediction_type(path, model_cfg.prediction_type)
    folder = ckpt.prepared_config_folder(family.config_folder_name(prediction), config_folder)
    try:
        parts = _parts_from_state_dict(state_dict, family, folder, dtype, skip_vae=bool(model_cfg.vae))
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot convert this {family.name} checkpoint "
                             f"({str(exc).splitlines()[0]})") from None
    del state_dict
    _maybe_replace_vae(parts, model_cfg, family, dtype, config_folder=folder)
    bundle = bundle_from_diffusers(parts, family.name, prediction, device, dtype, name=path.stem)
    bundle.model_hash, bundle.legacy_hash = ckpt.file_hashes(path)
    return bundle


def _vae_dtype(family: Family, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if family.vae_fp32 else dtype


def _maybe_replace_vae(parts: dict[str, Any], model_cfg: ModelConfig, family: Family, dtype: torch.dtype,
                       config_folder: Path | None = None) -> None:
    if model_cfg.vae:
        parts["vae"] = load_vae(Path(model_cfg.vae).expanduser(), family, dtype, config_folder=config_folder)


def load_vae(path: Path, family: Family, dtype: torch.dtype, *, config_folder: Path | None = None) -> Any:
    """A separate VAE: a diffusers folder (with config.json or a vae/ subfolder) or a single file."""
    import diffusers

    if not path.exists():
        raise ModelLoadError(f"model.vae: {path} does not exist; check the path or leave model.vae empty")
    vae_dtype = _vae_dtype(family, dtype)
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            return diffusers.AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=vae_dtype,
                                                           local_files_only=True)
        folder = config_folder or ckpt.prepared_config_folder(family.config_folder_name("epsilon"))
        sd = ckpt.read_state_dict(path, allow_pickle=False)
        # Standalone VAE files store the bare AutoencoderKL keys; diffusers accepts both layouts.
        return diffusers.AutoencoderKL.from_single_file(sd, config=str(folder), subfolder="vae",
                                                        torch_dtype=vae_dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"model.vae: cannot load {path} ({str(exc).splitlines()[0]})") from None
