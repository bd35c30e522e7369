"""Loading the parts of a Flux.1 / SD3.5 model offline: a diffusers pipeline folder, or a
transformer-only single file plus the other parts named in the config (kohya's ``clip_l``,
``clip_g``, ``t5xxl``, ``ae``), each a single file or a diffusers folder, configured by the
config-only folders shipped in ``models/configs``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from lora_trainer.config import ModelConfig

# Prefixes a separately saved text encoder or VAE may carry (ComfyUI, SD3 all-in-one files).
_PART_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.",
                  "text_encoders.t5xxl.transformer.", "cond_stage_model.transformer.", "first_stage_model.",
                  "vae.", "model.")
# What a loaded module may lack from a file: tied or derived buffers.
_MAY_MISS = ("position_ids", "encoder.embed_tokens.weight")
# Where an all-in-one checkpoint keeps the parts besides the transformer.
_EMBEDDED = {"model.clip_l": ("text_encoders.clip_l.",), "model.clip_g": ("text_encoders.clip_g.",),
             "model.t5xxl": ("text_encoders.t5xxl.",), "model.vae": ("first_stage_model.", "vae.")}
_MODEL_CLASSES = {"clip": "CLIPTextModel", "clip_proj": "CLIPTextModelWithProjection", "t5": "T5EncoderModel"}


def _field_value(model_cfg: ModelConfig, field: str) -> str | None:
    return getattr(model_cfg, field.split(".", 1)[1], None) if field else None


def _text_model(kind: str, source: Path, config_dir: Path, dtype: torch.dtype, field: str) -> Any:
    """A CLIP/T5 encoder from a diffusers folder, or from a single file configured by ``config_dir``."""
    import transformers

    if source.is_dir():
        sub = next((s for s in ("", "text_encoder") if (source / s / "config.json").is_file()), None)
        if sub is None:
            raise ModelLoadError(f"{field}: {source} has no config.json; point it at the model file or its folder")
        cls = getattr(transformers, _MODEL_CLASSES[kind])
        return cls.from_pretrained(str(source / sub), torch_dtype=dtype, local_files_only=True)
    from lora_trainer.models.checkpoint import read_state_dict

    return _text_model_from(kind, read_state_dict(source, allow_pickle=False), config_dir, dtype, field, source)


def _text_model_from(kind: str, state_dict: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype,
                     field: str, source: Path) -> Any:
    import transformers

    cls = getattr(transformers, _MODEL_CLASSES[kind])
    model = cls(cls.config_class.from_pretrained(str(config_dir), local_files_only=True))
    load_renamed(model, state_dict, field, source)
    return model.to(dtype)


def _renamed(key: str, own: set[str]) -> str:
    """``key`` as ``own`` (the model's keys) spells it: known prefixes dropped, ``text_model.``
    added or dropped (transformers 5 CLIP has no such prefix; most files do)."""
    for c in [key] + [key[len(p):] for p in _PART_PREFIXES if key.startswith(p)]:
        for k in (c, c.removeprefix("text_model."), "text_model." + c):
            if k in own:
                return k
    return key


def load_renamed(model: Any, state_dict: dict[str, torch.Tensor], field: str, source: Path) -> None:
    """Load ``state_dict`` into ``model`` under the model's own key spelling; a missing weight is a
    one-line error."""
    own = set(model.state_dict())
    result = model.load_state_dict({_renamed(k, own): v for k, v in state_dict.items()}, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_MAY_MISS)]
    if missing:
        raise ModelLoadError(f"{field}: {source} does not hold this model's weights (missing {missing[0]} "
                             f"and {len(missing) - 1} more); is it the right file?")


def _vae(source: Path, config_dir: Path, dtype: torch.dtype, field: str) -> Any:
    from diffusers import AutoencoderKL

    if not source.is_dir():
        from lora_trainer.models.checkpoint import read_state_dict

        return _vae_from(read_state_dict(source, allow_pickle=False), config_dir, dtype, field, source)
    try:
        sub = "vae" if (source / "vae" / "config.json").is_file() else None
        return AutoencoderKL.from_pretrained(str(source), subfolder=sub, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{field}: cannot load the VAE {source} ({str(exc).splitlines()[0]})") from None


def _vae_from(state_dict: dict[str, torch.Tensor], config_dir: Path, dtype: torch.dtype, field: str,
              source: Path) -> Any:
    """The VAE of an original-layout (BFL / LDM) state dict, bare or under first_stage_model./vae."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_single_file(state_dict, config=str(config_dir.parent), subfolder=config_dir.name,
                                              torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{field}: cannot load the VAE {source} ({str(exc).splitlines()[0]})") from None


def embedded_part(state_dict: dict[str, Any], field: str) -> dict[str, Any] | None:
    """The tensors of the part ``field`` names when the checkpoint carries it (ComfyUI's and SD3's
    all-in-one files: ``text_encoders.clip_l.transformer.``, ``first_stage_model.``, ...), else None."""
    prefixes = _EMBEDDED.get(field)
    found = {k: v for k, v in state_dict.items() if k.startswith(prefixes)} if prefixes else {}
    return found or None


def _tokenizer(kind: str, folder: Path | None, field: str) -> Any:
    if kind == "t5_tokenizer":
        return t5_tokenizer(folder, field)
    return clip_tokenizer(folder, "!" if kind == "clip_tokenizer_bang" else "<|endoftext|>")


def _part(kind: str, source: Path | None, config_dir: Path, dtype: torch.dtype, field: str) -> Any:
    if kind.endswith(("tokenizer", "tokenizer_bang")):
        return _tokenizer(kind, source, field)
    if source is None or not source.exists():
        raise ModelLoadError(f"{field}: {source or '(not set)'} does not exist; check the path")
    if kind == "vae":
        return _vae(source, config_dir, dtype, field)
    return _text_model(kind, source, config_dir, dtype, field)


def load_pipeline_folder(path: Path, model_cfg: ModelConfig, dtype: torch.dtype, spec: dict[str, tuple[str, str]],
                         transformer_cls: Any) -> dict[str, Any]:
    """The parts of a diffusers pipeline folder; a part named in the config replaces the folder's."""
    parts: dict[str, Any] = {}
    try:
        parts["transformer"] = transformer_cls.from_pretrained(str(path), subfolder="transformer",
                                                               torch_dtype=dtype, local_files_only=True)
        for sub, (kind, field) in spec.items():
            given = user_path(_field_value(model_cfg, field))
            source = given if given is not None else path / sub
            if not source.exists() and not kind.endswith(("tokenizer", "tokenizer_bang")):
                raise ModelLoadError(f"{path}: the folder has no {sub}/; re-download the model or set {field}")
            parts[sub] = _part(kind, source, path / sub, dtype, field or f"{path}/{sub}")
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers model ({str(exc).splitlines()[0]})") from None
    return parts


def check_part_fields(model_cfg: ModelConfig, spec: dict[str, tuple[str, str]], state_dict: dict[str, Any]) -> None:
    """Before any loading: every part a single-file transformer needs is named and exists, or the
    checkpoint carries it (a one-line error naming the field otherwise)."""
    for kind, field in spec.values():
        source = user_path(_field_value(model_cfg, field))
        if kind == "t5_tokenizer":
            t5_tokenizer_files(source, field)
        elif field and not kind.endswith(("tokenizer", "tokenizer_bang")):
            if source is None and embedded_part(state_dict, field) is None:
                raise ModelLoadError(f"{field} is not set and the checkpoint does not carry it; give its "
                                     ".safetensors file or a diffusers folder of that part")
            if source is not None and not source.exists():
                raise ModelLoadError(f"{field}: {source} does not exist; check the path")


def load_other_parts(model_cfg: ModelConfig, folder: Path, dtype: torch.dtype, spec: dict[str, tuple[str, str]],
                     path: Path, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Text encoders, VAE and tokenizers of a single-file transformer: from their config fields,
    else from the checkpoint ``path`` itself when it carries them."""
    parts: dict[str, Any] = {}
    for sub, (kind, field) in spec.items():
        source = user_path(_field_value(model_cfg, field))
        inside = embedded_part(state_dict, field) if source is None and field else None
        if inside is not None and kind == "vae":
            parts[sub] = _vae_from(inside, folder / sub, dtype, field, path)
        elif inside is not None:
            parts[sub] = _text_model_from(kind, inside, folder / sub, dtype, field, path)
        else:
            parts[sub] = _part(kind, source, folder / sub, dtype, field)
    return parts


def transformer_from_single_file(cls: Any, path: Path, state_dict: dict[str, Any], folder: Path,
                                 dtype: torch.dtype) -> Any:
    """The transformer of an original-layout (BFL / SD3) file, converted by diffusers with the
    config in ``folder/transformer`` (no hub)."""
    read_json(folder / "transformer" / "config.json")  # a clear error when the folder is wrong
    try:
        return cls.from_single_file(state_dict, config=str(folder), subfolder="transformer", torch_dtype=dtype,
                                    local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: cannot convert this transformer ({str(exc).splitlines()[0]})") from None


# -- tokenizers and user paths ----------------------------------------------------------------
def clip_tokenizer(folder: Path | None, pad: str) -> Any:
    """CLIP's tokenizer from a diffusers tokenizer folder, else the one built from open_clip's BPE."""
    from transformers import CLIPTokenizer

    if folder is not None and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer(pad_token=pad)


_T5_HINT = ("point it at a folder with T5's tokenizer files (tokenizer.json or spiece.model), e.g. the "
            "tokenizer_2 folder of a FLUX.1 or the tokenizer_3 folder of an SD3.5 diffusers model")


def t5_tokenizer_files(folder: Path | None, field: str) -> Path:
    """``folder`` when it holds T5 tokenizer files; T5's vocabulary ships with no package here,
    so a missing one is a one-line error naming the config field."""
    from lora_trainer.errors import ModelLoadError

    if folder is None:
        raise ModelLoadError(f"{field} is not set; {_T5_HINT}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()):
        raise ModelLoadError(f"{field}: {folder} has no tokenizer.json or spiece.model; {_T5_HINT}")
    return folder


def t5_tokenizer(folder: Path | None, field: str) -> Any:
    """T5's tokenizer from ``folder`` (see :func:`t5_tokenizer_files`)."""
    from transformers import AutoTokenizer

    from lora_trainer.errors import ModelLoadError

    folder = t5_tokenizer_files(folder, field)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{field}: cannot read the T5 tokenizer in {folder} ({str(exc).splitlines()[0]})") from None


def read_json(path: Path) -> dict[str, Any]:
    from lora_trainer.errors import ModelLoadError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise ModelLoadError(f"{path} is missing or not valid JSON") from None


def user_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None
