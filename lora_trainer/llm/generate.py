"""Generate text with a base model and, optionally, a trained text-LoRA adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import ConfigError, ModelLoadError
from lora_trainer.llm.config import LLMModelConfig
from lora_trainer.llm.data import format_prompt
from lora_trainer.llm.model import load_model, load_tokenizer


def adapter_base_model(adapter: str | Path) -> str:
    """The base model folder an adapter was trained on (from its adapter_config.json)."""
    cfg_file = Path(adapter) / "adapter_config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"--adapter: {adapter} has no adapter_config.json; give a folder written by training")
    return str(json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path") or "")


def load_for_generation(model: str | None, adapter: str | None, device: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) with the adapter applied; the tokenizer comes from the adapter when it has one."""
    from peft import PeftModel

    base = model or (adapter_base_model(adapter) if adapter else "")
    if not base:
        raise ConfigError("--model: give the base model folder (or an --adapter whose config names it)")
    lm, tokenizer, _ = load_model(LLMModelConfig(base_model=base, device=device))
    if adapter:
        adapter_base_model(adapter)  # checks the folder
        lm = PeftModel.from_pretrained(lm, str(adapter))
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adapter)
    lm.eval()
    return lm, tokenizer


def generate(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.7,
             top_p: float = 0.95, seed: int | None = None, chat: bool = True, system: str = "") -> str:
    """The model's continuation of ``prompt`` (formatted as a chat turn when ``chat``)."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: {max_new_tokens} must be at least 1")
    if temperature < 0:
        raise ConfigError(f"--temperature: {temperature} must be 0 (greedy) or more")
    text = format_prompt(tokenizer, prompt, use_chat_template=True, system=system) if chat else prompt
    templated = chat and bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    if seed is not None:
        torch.manual_seed(seed)
    sampling: dict[str, Any] = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
