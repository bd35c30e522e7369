"""What the rectified-flow transformer families (Flux.1, SD3.5) share: the family base class,
tokenizers (CLIP built in, T5 from files the user has), LoRA targets and key naming, the
quantized base weights (fp8 storage, 4-bit through bitsandbytes) and the bundle's assembly.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.families.base import Family

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lora_trainer.config import ModelConfig
    from lora_trainer.models.bundle import ModelBundle

T5_NAMING = "hf_t5"
# Linear layers inside the transformer's blocks (double/joint and single blocks), except the
# adaLN modulation (``norm*.linear``), which kohya leaves out by default.
_BLOCK_LINEAR_RE = re.compile(r"^(?:single_)?transformer_blocks\.\d+\.")
_MODULATION_RE = re.compile(r"(?:^|\.)norm[^.]*\.")
CONFIGS = Path(__file__).resolve().parent.parent / "models" / "configs"


def block_linears(transformer: nn.Module) -> list[str]:
    """Every Linear layer inside the transformer's blocks (nearly all its weights): what fp8 /
    nf4 storage applies to."""
    from torch import nn

    return [p for p, m in transformer.named_modules() if isinstance(m, nn.Linear) and _BLOCK_LINEAR_RE.match(p)]


def block_linear_targets(transformer: nn.Module) -> list[str]:
    """Attention projections (q/k/v/out and the context stream's add_*/to_add_out) and the
    feed-forward Linear layers of every block: what kohya trains on Flux and SD3."""
    return [p for p in block_linears(transformer) if not _MODULATION_RE.search(p)]


class FlowFamily(Family):
    """A transformer family trained with rectified flow; the subclasses add variants and I/O."""

    latent_channels = 16
    # The T5 root: never trained, no LoRA targets.
    t5_root: str = ""
    # Variants ("dev", "schnell", "medium", "large") -> denoiser parameter count (memory model).
    denoiser_params: dict[str, int] = {}
    pipeline_class: str = ""
    # Storage precisions of the denoiser's Linear weights besides the compute dtype.
    quantized_weights: tuple[str, ...] = ("fp8", "nf4")

    def matches_folder(self, path: Path, index: dict[str, Any]) -> bool:
        return index.get("_class_name") == self.pipeline_class

    def lora_key(self, root: str, naming: str, path: str, part: str = "") -> str | None:
        from lora_trainer.errors import LoraFormatError
        from lora_trainer.families.flow_lora import dit_lora_key

        if part:
            raise LoraFormatError(f"{self.label}: module {path!r} has no part {part!r}")
        return dit_lora_key(self.name, root, path)

    def default_targets(self, root: str, module: Any, naming: str) -> list[str] | None:
        if root == self.denoiser_root:
            return block_linear_targets(module)
        if root == self.t5_root:
            return []
        return None  # CLIP: kohya's text-encoder defaults

    transformer_denoiser = True

    def config_folder(self, variant: str = "") -> Path:
        """The packaged config-only folder of ``variant`` (full-size numbers, no weights)."""
        return config_folder(f"{self.name}_{variant or self.default_variant()}")

    def variants(self) -> tuple[str, ...]:
        return tuple(self.denoiser_params)

    def tiny_denoiser_config(self, variant: str) -> dict[str, Any]:
        """The transformer config of the family's tiny test model of ``variant``."""
        raise NotImplementedError

    def tiny_vae_config(self) -> dict[str, Any]:
        from lora_trainer.families.flow_tiny_configs import flow_vae_config

        return flow_vae_config(self.name)

    def text_encoder_bytes(self, weight_dtype: str, compute_bytes: int) -> int:
        """With fp8 / nf4, T5's Linear layers but ``wo`` are stored in fp8 (:func:`quantize_base`)."""
        total = self.text_encoder_params * compute_bytes
        if weight_dtype not in ("fp8", "nf4"):
            return total
        return total - sum(self._t5_linear_params()) * (compute_bytes - 1)

    @functools.cache  # noqa: B019 - one per family object, which live as long as the process
    def _t5_linear_params(self) -> tuple[int, ...]:
        import torch
        from transformers import T5Config, T5EncoderModel

        sub = next(folder for folder, (kind, _) in self.folder_parts().items() if kind == "t5")
        with torch.device("meta"):
            t5 = T5EncoderModel(T5Config.from_pretrained(str(self.config_folder() / sub)))
        return tuple(t5.get_submodule(p).weight.numel() for p in t5_linears(t5))

    def denoiser_class(self) -> Any:
        raise NotImplementedError

    def folder_parts(self) -> dict[str, tuple[str, str]]:
        """{pipeline folder: (kind, config field that replaces it)} of everything but the transformer."""
        raise NotImplementedError

    def variant_of_state_dict(self, state_dict: dict[str, Any]) -> str:
        raise NotImplementedError

    def build_bundle(self, parts: dict[str, Any], device: torch.device, dtype: torch.dtype, name: str,
                     weight_dtype: str = "auto") -> ModelBundle:
        raise NotImplementedError

    def load_folder(self, path: Path, model_cfg: ModelConfig, device: torch.device,
                    dtype: torch.dtype) -> ModelBundle:
        from lora_trainer.families.flow_io import load_pipeline_folder

        parts = load_pipeline_folder(path, model_cfg, dtype, self.folder_parts(), self.denoiser_class())
        return self.build_bundle(parts, device, dtype, path.name, model_cfg.weight_dtype)

    def load_single_file(self, path: Path, state_dict: dict[str, Any], model_cfg: ModelConfig,
                         device: torch.device, dtype: torch.dtype,
                         config_folder: Path | None = None) -> ModelBundle:
        from lora_trainer.families.flow_io import check_part_fields, load_other_parts, transformer_from_single_file
        from lora_trainer.models.checkpoint import file_hashes

        check_part_fields(model_cfg, self.folder_parts(), state_dict)
        folder = config_folder or self.config_folder(self.variant_of_state_dict(state_dict))
        transformer = transformer_from_single_file(self.denoiser_class(), path, state_dict, folder, dtype)
        parts = {"transformer": transformer,
                 **load_other_parts(model_cfg, folder, dtype, self.folder_parts(), path, state_dict)}
        bundle = self.build_bundle(parts, device, dtype, path.stem, model_cfg.weight_dtype)
        bundle.model_hash, bundle.legacy_hash = file_hashes(path)
        return bundle

    def meta_denoiser(self, variant: str = "", size: str = "full") -> nn.Module:
        """The full-size (or ``size`` "tiny") denoiser of ``variant`` (default: the first) on the
        meta device: shapes and parameter counts for the memory estimate, no memory used."""
        import torch

        cls = self.denoiser_class()
        variant = variant or self.default_variant()
        if size == "full":
            config = cls.load_config(str(self.config_folder(variant) / "transformer"))
        else:
            config = self.tiny_denoiser_config(variant)
        with torch.device("meta"):
            return cls.from_config(config)

    def denoiser_weight_bytes(self, variant: str = "", weight_dtype: str = "bf16") -> int:
        """Bytes of the frozen denoiser as stored (memory estimate): the block Linear weights at
        1 byte (fp8) or 4 bits plus one fp32 scale per 64 (nf4), the rest in the compute dtype
        (4 bytes for fp32, else 2)."""
        model = self.meta_denoiser(variant)
        compute = 4 if weight_dtype == "fp32" else 2
        total = sum(p.numel() for p in model.parameters())
        per_weight = {"fp8": 1.0, "nf4": 0.5 + 4 / 64}.get(weight_dtype)
        if per_weight is None:
            return total * compute
        linear = sum(model.get_submodule(p).weight.numel() for p in block_linears(model))
        return int(linear * per_weight) + (total - linear) * compute

    def lora_metadata(self, bundle: ModelBundle) -> dict[str, str]:
        from lora_trainer.families.flow_lora import DIT_METADATA

        return dict(DIT_METADATA[f"{self.name}-{bundle.extras.get('variant', '')}"])

    def base_model_version(self, prediction_type: str) -> str:
        from lora_trainer.families.flow_lora import DIT_METADATA

        return next(v["ss_base_model_version"] for k, v in DIT_METADATA.items() if k.startswith(self.name + "-"))

    def modelspec_architecture(self, prediction_type: str) -> str:
        from lora_trainer.families.flow_lora import DIT_METADATA

        return next(v["modelspec.architecture"] for k, v in DIT_METADATA.items() if k.startswith(self.name + "-"))

    def matches_lora_metadata(self, metadata: dict[str, str]) -> bool:
        from lora_trainer.families.flow_lora import family_from_metadata

        return family_from_metadata(metadata) == self.name

    def matches_lora_keys(self, keys: set[str]) -> bool:
        from lora_trainer.families.flow_lora import dit_family_from_keys

        return dit_family_from_keys(keys, {}) == self.name

    def known_lora_key(self, key: str) -> bool | None:
        from lora_trainer.families.flow_lora import known_file_key

        return known_file_key(self.name, key)

    def file_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from lora_trainer.families.flow_lora import file_tensors

        return file_tensors(self.name, tensors)

    def module_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from lora_trainer.families.flow_lora import module_tensors

        return module_tensors(self.name, tensors)

    def fused_file_layer(self, key: str) -> str | None:
        from lora_trainer.families.flow_lora import SEP

        return key.split(SEP)[0] if SEP in key else None

    def inspect_report(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any] | None:
        from lora_trainer.families.flow_inspect import analyse_dit

        return analyse_dit(self.name, tensors, metadata)


# -- tokenizers --------------------------------------------------------------------------------








def t5_dtype(dtype: torch.dtype) -> torch.dtype:
    """T5 v1.1 overflows in fp16 (inf activations): it runs in bf16 when the model is fp16."""
    import torch

    return torch.bfloat16 if dtype == torch.float16 else dtype


def check_patchable(latents: torch.Tensor) -> None:
    """The transformers cut latents into 2x2 patches: image sides must be multiples of 16."""
    if latents.shape[-1] % 2 or latents.shape[-2] % 2:
        from lora_trainer.errors import ConfigError

        h, w = latents.shape[-2] * 8, latents.shape[-1] * 8
        raise ConfigError(f"data.resolution / data.bucket_step: a {w}x{h} image does not cut into Flux.1/SD3.5's "
                          "2x2 latent patches; use sides that are multiples of 16")


def token_ids(tokenizer: Any, captions: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    out = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids.to(device)


# -- quantized base weights --------------------------------------------------------------------
def _fp8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    bias = self.bias.to(x.dtype) if self.bias is not None else None
    return F.linear(x, self.weight.to(x.dtype), bias)


class Fp8Linear:
    """Marker mixin: a Linear whose weight is stored as float8_e4m3fn and upcast per call (as
    kohya's fp8_base). ``compute_dtype`` tells peft which dtype its adapters should take."""


@functools.cache
def _fp8_class(base: type) -> type:
    return type(f"Fp8{base.__name__}", (Fp8Linear, base), {"forward": _fp8_forward})


def store_fp8(module: nn.Module, compute_dtype: torch.dtype, paths: list[str] | None = None) -> int:
    """Store the Linear weights at ``paths`` (default: every block Linear) of ``module`` as
    float8_e4m3fn; returns how many. The layers stay ``nn.Linear`` (peft wraps them as usual)
    and compute in the input's dtype."""
    import torch
    from torch import nn

    paths = block_linears(module) if paths is None else paths
    for path in paths:
        layer = module.get_submodule(path)
        layer.weight = nn.Parameter(layer.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
        layer.__class__ = _fp8_class(type(layer))
        layer.compute_dtype = compute_dtype
    return len(paths)


def t5_linears(t5: nn.Module) -> list[str]:
    """T5's Linear layers but the feed-forward output ``wo``, which T5 casts its input to (as
    transformers keeps it in fp32 for 8-bit T5)."""
    from torch import nn

    return [p for p, m in t5.named_modules() if isinstance(m, nn.Linear) and not p.endswith(".wo")]


def store_nf4(module: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every block Linear with bitsandbytes' 4-bit (NF4) layer; a one-line error without it."""
    from lora_trainer.errors import ModelLoadError

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ModelLoadError("model.weight_dtype nf4 needs bitsandbytes; pip install bitsandbytes "
                             "(or use fp8)") from None
    count = 0
    for path in block_linears(module):
        old = module.get_submodule(path)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.detach().cpu(), requires_grad=False, quant_type="nf4")
        if old.bias is not None:
            new.bias = old.bias
        new.to(old.weight.device)  # bitsandbytes quantizes on the move to the GPU
        parent, _, child = path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, new)
        count += 1
    return count


def place_parts(parts: dict[str, Any], keys: tuple[str, ...], t5_key: str, device: torch.device,
                dtype: torch.dtype, weight_dtype: str) -> dict[str, Any]:
    """Move the pipeline parts ``keys`` to ``device`` in ``dtype`` (T5 in :func:`t5_dtype`), frozen.
    With fp8 / nf4 the transformer and T5 are cast and quantized where they are (the host's memory)
    and only then moved: a card never holds them at full width. Inside
    :func:`~lora_trainer.models.placement.denoiser_placed_later` the transformer stays in the
    host's memory; returns the bundle extras that say where it goes."""
    from lora_trainer.models import placement
    from lora_trainer.models.setups import _place

    quantized = weight_dtype in ("fp8", "nf4")
    home = {"transformer": placement.denoiser_target(device)}
    for key in keys:
        target = t5_dtype(dtype) if key == t5_key else dtype
        here = next(parts[key].parameters()).device if quantized and key in ("transformer", t5_key) else home.get(key, device)
        _place(parts[key], here, target)
    quantize_base(parts["transformer"], parts[t5_key], weight_dtype, dtype)
    if quantized:
        for key in ("transformer", t5_key):
            parts[key].to(home.get(key, device))  # a device move only: fp8 weights stay fp8, bitsandbytes quantizes here
    return placement.deferred_extras(device)


def quantize_base(module: nn.Module, t5: nn.Module, weight_dtype: str, compute_dtype: torch.dtype) -> None:
    """Apply ``model.weight_dtype`` fp8 / nf4 to the denoiser's block Linear layers, and fp8 to
    T5's (as kohya's fp8_base: T5-XXL then takes ~5.5 GiB instead of 9); else nothing."""
    if weight_dtype not in ("fp8", "nf4"):
        return
    if weight_dtype == "fp8":
        store_fp8(module, compute_dtype)
    else:
        store_nf4(module, compute_dtype)
    store_fp8(t5, next(t5.parameters()).dtype, t5_linears(t5))


# -- folders -----------------------------------------------------------------------------------


def config_folder(name: str, override: Path | None = None) -> Path:
    """The packaged config-only folder ``models/configs/<name>`` (or the caller's)."""
    return override if override is not None else CONFIGS / name


