"""Load a causal LM and its tokenizer from a local folder; choose and inject LoRA targets."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.llm.config import LLMModelConfig, LLMNetworkConfig

log = logging.getLogger(__name__)
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"model.device: '{name}' is not a device; use auto, cpu, cuda, cuda:1 or mps") from None


def run_precision(mixed_precision: str, device: torch.device) -> str:
    """``train.mixed_precision`` as a text run trains on ``device``: "auto" follows the image
    trainer's rule for a run without a host (bf16 on a CUDA GPU that has it, fp16 on other CUDA
    GPUs, "no" elsewhere)."""
    from lora_trainer.models.loaders import resolve_mixed_precision

    return resolve_mixed_precision(mixed_precision, device)


def resolve_dtype(name: str, mixed_precision: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu" or mixed_precision == "no":
        return torch.float32
    return _DTYPES[mixed_precision]


def check_model_folder(path: str) -> Path:
    folder = Path(path).expanduser()
    if not path.strip():
        raise ConfigError("model.base_model: empty; give the folder of a transformers model (config.json + weights)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model.base_model: {folder} has no config.json; give a local transformers model "
                             "folder (e.g. from 'huggingface-cli download NAME --local-dir DIR')")
    return folder


def _quantization(cfg: LLMModelConfig, dtype: torch.dtype, device: torch.device) -> Any:
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("model.load_in_4bit/load_in_8bit need the package bitsandbytes: pip install bitsandbytes "
                          "(CUDA GPU only), or turn them off")
    if device.type != "cuda":
        raise ConfigError(f"model.load_in_4bit/load_in_8bit need a CUDA GPU (device is {device}); turn them off")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # right padding is masked out, so EOS is a safe pad
    return tok


def load_model(cfg: LLMModelConfig, mixed_precision: str = "no") -> tuple[Any, Any, torch.device]:
    """(model, tokenizer, device). The base weights are frozen; quantized models go to the GPU."""
    import transformers
    from transformers import AutoModelForCausalLM

    folder = check_model_folder(cfg.base_model)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, mixed_precision, device)
    quant = _quantization(cfg, dtype, device)
    # transformers 5 calls it dtype; 4.x (4.30 in the A1111 WebUI) torch_dtype
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: dtype, "trust_remote_code": cfg.trust_remote_code, "local_files_only": True}
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"{folder}: this model needs its own code; set model.trust_remote_code: true "
                              "if you trust it") from None
        raise ModelLoadError(f"{folder}: cannot load as a causal LM ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ModelLoadError(f"{folder}: cannot read the model ({str(e).splitlines()[0]})") from None
    if quant is None:
        model.to(device)
    model.requires_grad_(False)
    return model, load_tokenizer(folder), device


def _is_linear(module: nn.Module) -> bool:
    # GPT-2 family uses transformers' Conv1D (a Linear with transposed weight); peft adapts both.
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


def detect_target_modules(model: nn.Module) -> list[str]:
    """Names of the linear layers inside the transformer blocks (every one but the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
             if _is_linear(mod) and mod is not head and name.rsplit(".", 1)[-1] not in ("lm_head", "score")}
    if not names:
        raise ConfigError(f"{type(model).__name__} has no linear layers to adapt; set network.target_modules")
    return sorted(names)


def add_lora(model: nn.Module, cfg: LLMNetworkConfig, seed: int) -> tuple[Any, list[str]]:
    """Wrap ``model`` in a peft LoRA (in place) and return (peft_model, target names)."""
    from peft import LoraConfig, get_peft_model

    targets = list(cfg.target_modules) or detect_target_modules(model)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"network.target_modules: {missing} not found in the model; "
                          f"its linear layers are {detect_target_modules(model)}")
    conv1d = any(type(m).__name__ == "Conv1D" for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # LoRA A matrices are drawn here: same seed, same start
    with warnings.catch_warnings():
        # peft asks transformers 5 through its deprecated name; nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    # LoRA weights train in fp32 over fp16/bf16 base weights (the fp16 loss scaler needs fp32
    # gradients); peft before 0.12 leaves them in the base layer's dtype.
    for p in peft_model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    return peft_model, targets
