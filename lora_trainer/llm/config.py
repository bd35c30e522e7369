"""LLMTrainConfig: the one description of a text-LoRA run (``task: llm``).

Same conventions as the image :class:`~lora_trainer.config.TrainConfig`: nested dataclasses with
help texts, filled by field path (``network.rank``) from YAML, ``--set`` overrides or the UI, with
the flat keys people know (``base_model``, ``train_file``, ``lora_rank``, ...) as aliases. Key
resolution, coercion, the "did you mean" hints and the generated docs are the image config's
(:class:`~lora_trainer.config_schema.ConfigSchema`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_trainer.config import _f, read_yaml
from lora_trainer.config_schema import ConfigRoot, ConfigSchema
from lora_trainer.errors import ConfigError


@dataclass
class LLMModelConfig:
    base_model: str = _f("", "Local folder of a transformers causal LM (GPT-2, Llama, Qwen, Mistral families) with its tokenizer.")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = _f("auto", "dtype of the frozen base weights; 'auto' is fp32 on CPU and follows train.mixed_precision on a GPU.")
    load_in_4bit: bool = _f(False, "Load the base model in 4-bit NF4 (QLoRA). Needs bitsandbytes and a CUDA GPU.")
    load_in_8bit: bool = _f(False, "Load the base model in 8-bit. Needs bitsandbytes and a CUDA GPU.")
    trust_remote_code: bool = _f(False, "Allow the model folder's own Python code to run. Only for models you trust.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")


@dataclass
class LLMDataConfig:
    train_file: str = _f("", "Training data: a .jsonl file (one JSON object per line) or a .csv file.")
    format: Literal["auto", "jsonl", "csv"] = _f("auto", "File format; 'auto' goes by the file extension.")
    prompt_field: str = _f("prompt", "Field holding the user's message (prompt/response records).")
    response_field: str = _f("response", "Field holding the reply to learn (prompt/response records).")
    text_field: str = _f("text", "Field holding plain text to learn as a whole (text records).")
    messages_field: str = _f("messages", "Field holding a chat: a list of {role, content} (chat records).")
    system_prompt: str = _f("", "System message put before every prompt/response record (empty: none).")
    use_chat_template: bool = _f(True, "Format prompts with the tokenizer's chat template when it has one (else '### User:/### Assistant:').")
    response_only_loss: bool = _f(True, "Learn only the replies: prompt and system tokens get no loss.")
    max_length: int = _f(1024, "Longest sample in tokens; longer ones are truncated (and counted in the report).")
    packing: bool = _f(False, "Concatenate samples and cut them into max_length blocks (faster on many short samples).")
    eval_split: float = _f(0.0, "Share of the samples held out for the eval loss (0 disables; e.g. 0.1). Picked with train.seed.")


@dataclass
class LLMNetworkConfig:
    rank: int = _f(8, "LoRA rank.")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.05, "Dropout on the LoRA path.")
    target_modules: list[str] = _f([], "Layer names to adapt; empty: every linear layer in the transformer blocks (GPT-2: c_attn, c_proj, c_fc; Llama/Qwen/Mistral: q/k/v/o_proj, gate/up/down_proj).")


@dataclass
class LLMOptimConfig:
    learning_rate: float = _f(2e-4, "Learning rate.")
    weight_decay: float = _f(0.0, "Weight decay (AdamW).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts"] = _f("cosine", "Learning-rate schedule after warmup.")
    lr_warmup_steps: int = _f(0, "Linear warmup steps.")
    lr_num_cycles: int = _f(1, "Restarts for cosine_with_restarts.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables).")


@dataclass
class LLMLoopConfig:
    epochs: int = _f(3, "Passes over the training samples (ignored when max_steps is set).")
    max_steps: int | None = _f(None, "Stop after this many optimizer steps.")
    batch_size: int = _f(4, "Samples per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f("auto", "Autocast precision: auto is bf16 on a CUDA GPU that has it, fp16 on other CUDA GPUs, no (fp32) on a CPU or Apple GPU. LoRA weights stay fp32 (fp16 uses loss scaling on CUDA).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    seed: int = _f(42, "Random seed (LoRA init, data order, dropout, eval split).")
    save_steps: int = _f(0, "Save a resumable checkpoint every N steps (0: only when stopped).")
    eval_steps: int = _f(0, "Compute the eval loss every N steps (0: only at the end).")
    resume: str | None = _f(None, "'latest' or a checkpoint folder to continue a run.")


@dataclass
class LLMOutputConfig:
    output_dir: str = _f("output", "Folder for the adapter, checkpoints and TensorBoard logs.")
    output_name: str = _f("text_lora", "Name of the adapter folder (<output_dir>/<output_name>).")
    overwrite: bool = _f(False, "Replace an adapter folder of the same name (kept in .backup); default writes <name>_v2, _v3, ...")
    save_merged: bool = _f(False, "Also save the base model with the LoRA merged in (<output_name>-merged).")
    tensorboard: bool = _f(True, "Write TensorBoard logs to <output_dir>/logs/<output_name>.")
    keep_checkpoints: int = _f(3, "How many step checkpoints of a run to keep (0 keeps all).")


SECTIONS: dict[str, type] = {
    "model": LLMModelConfig,
    "data": LLMDataConfig,
    "network": LLMNetworkConfig,
    "optim": LLMOptimConfig,
    "train": LLMLoopConfig,
    "output": LLMOutputConfig,
}


@dataclass
class LLMTrainConfig(ConfigRoot):
    task: Literal["llm"] = _f("llm", "Always 'llm' for text LoRA.")
    model: LLMModelConfig = field(default_factory=LLMModelConfig)
    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    network: LLMNetworkConfig = field(default_factory=LLMNetworkConfig)
    optim: LLMOptimConfig = field(default_factory=LLMOptimConfig)
    train: LLMLoopConfig = field(default_factory=LLMLoopConfig)
    output: LLMOutputConfig = field(default_factory=LLMOutputConfig)

    def __post_init__(self) -> None:
        validate(self)


# Flat keys (the seeds' and common trainers' names) -> field paths.
ALIASES: dict[str, str] = {
    "base_model": "model.base_model",
    "model_name_or_path": "model.base_model",
    "pretrained_model_name_or_path": "model.base_model",
    "torch_dtype": "model.dtype",
    "load_in_4bit": "model.load_in_4bit",
    "load_in_8bit": "model.load_in_8bit",
    "trust_remote_code": "model.trust_remote_code",
    "train_file": "data.train_file",
    "train_data": "data.train_file",
    "data_file": "data.train_file",
    "dataset": "data.train_file",
    "system_prompt": "data.system_prompt",
    "use_chat_template": "data.use_chat_template",
    "response_only_loss": "data.response_only_loss",
    "train_on_responses_only": "data.response_only_loss",
    "max_length": "data.max_length",
    "max_seq_length": "data.max_length",
    "cutoff_len": "data.max_length",
    "packing": "data.packing",
    "eval_split": "data.eval_split",
    "val_set_size": "data.eval_split",
    "lora_rank": "network.rank",
    "lora_r": "network.rank",
    "network_dim": "network.rank",
    "lora_alpha": "network.alpha",
    "network_alpha": "network.alpha",
    "lora_dropout": "network.dropout",
    "target_modules": "network.target_modules",
    "lora_target_modules": "network.target_modules",
    "learning_rate": "optim.learning_rate",
    "lr": "optim.learning_rate",
    "weight_decay": "optim.weight_decay",
    "lr_scheduler": "optim.lr_scheduler",
    "lr_scheduler_type": "optim.lr_scheduler",
    "lr_warmup_steps": "optim.lr_warmup_steps",
    "warmup_steps": "optim.lr_warmup_steps",
    "max_grad_norm": "optim.max_grad_norm",
    "epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "max_train_steps": "train.max_steps",
    "batch_size": "train.batch_size",
    "micro_batch_size": "train.batch_size",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "mixed_precision": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "seed": "train.seed",
    "save_steps": "train.save_steps",
    "eval_steps": "train.eval_steps",
    "resume": "train.resume",
    "resume_from_checkpoint": "train.resume",
    "output_dir": "output.output_dir",
    "output_name": "output.output_name",
    "save_merged": "output.save_merged",
}


SCHEMA = ConfigSchema(
    root=LLMTrainConfig, sections=SECTIONS, aliases=ALIASES, value_maps={}, label="text-LoRA config",
    help_hint="see docs/text-lora.md for every key",
    example_header=("# lora-trainer text-LoRA config. Every key but model.base_model and data.train_file is optional.",),
    nested="llm",
)


def flatten_user_dict(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Nested sections (also inside an ``llm:`` section), 'a.b' keys and aliases -> {path: value}."""
    return SCHEMA.flatten(data, source)


def build_llm_config(values: dict[str, Any], base: LLMTrainConfig | None = None) -> LLMTrainConfig:
    """Build an LLMTrainConfig from {field_path or alias: value} on top of ``base`` (or defaults)."""
    return SCHEMA.build(values, base)


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["network.rank=16", "lora_alpha=8"]`` -> {field_path: value} (values parsed as YAML)."""
    return SCHEMA.parse_set(items)


def is_llm_config(path: str | Path) -> bool:
    """True when the YAML file says ``task: llm`` (the train command hands it to text LoRA)."""
    return str(read_yaml(path).get("task", "")).strip().lower() == "llm"


def load_llm_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LLMTrainConfig:
    """Load a ``task: llm`` YAML (optional) and apply ``--set`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(path)
        task = str(raw.get("task", "llm")).strip().lower()
        if task != "llm":
            raise ConfigError(f"{path}: task is '{task}'; text LoRA needs 'task: llm'")
        values.update(flatten_user_dict(raw, source=str(path)))
    values.update(parse_set_overrides(overrides or []))
    return build_llm_config(values)


def validate(cfg: LLMTrainConfig) -> None:
    """Range and cross-field checks, one line each. Called from ``__post_init__``."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    m, d, n, o, t = cfg.model, cfg.data, cfg.network, cfg.optim, cfg.train
    need(not (m.load_in_4bit and m.load_in_8bit), "model: load_in_4bit and load_in_8bit are both true; pick one")
    need(not (cfg.output.save_merged and (m.load_in_4bit or m.load_in_8bit)),
         "output.save_merged: cannot merge into a 4/8-bit model; train, then merge the adapter into the full-precision base")
    need(d.max_length >= 8, f"data.max_length: {d.max_length} must be at least 8")
    need(0.0 <= d.eval_split < 1.0, f"data.eval_split: {d.eval_split} must be in [0, 1) (e.g. 0.1)")
    need(n.rank >= 1, f"network.rank: {n.rank} must be at least 1 (4-64 is typical)")
    need(n.alpha > 0, f"network.alpha: {n.alpha} must be above 0 (often 2 x rank)")
    need(0.0 <= n.dropout < 1.0, f"network.dropout: {n.dropout} must be in [0, 1)")
    need(o.learning_rate > 0, f"optim.learning_rate: {o.learning_rate} must be above 0")
    need(o.lr_warmup_steps >= 0, f"optim.lr_warmup_steps: {o.lr_warmup_steps} must be 0 or more")
    need(o.lr_num_cycles >= 1, f"optim.lr_num_cycles: {o.lr_num_cycles} must be at least 1")
    need(o.max_grad_norm >= 0, f"optim.max_grad_norm: {o.max_grad_norm} must be 0 or more")
    need(t.epochs >= 1, f"train.epochs: {t.epochs} must be at least 1")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps: {t.max_steps} must be at least 1 (or empty)")
    need(t.batch_size >= 1, f"train.batch_size: {t.batch_size} must be at least 1")
    need(t.gradient_accumulation_steps >= 1,
         f"train.gradient_accumulation_steps: {t.gradient_accumulation_steps} must be at least 1")
    need(t.save_steps >= 0, f"train.save_steps: {t.save_steps} must be 0 or more")
    need(t.eval_steps >= 0, f"train.eval_steps: {t.eval_steps} must be 0 or more")
    need(cfg.output.output_name.strip() != "", "output.output_name: must not be empty")
    need(cfg.output.keep_checkpoints >= 0, "output.keep_checkpoints: must be 0 or more")


def example_yaml() -> str:
    """A commented YAML with every key, its default and its help text."""
    return SCHEMA.example_yaml()


def reference_markdown() -> str:
    """The text-LoRA key table for the docs, generated from the help texts."""
    return SCHEMA.reference_markdown()
