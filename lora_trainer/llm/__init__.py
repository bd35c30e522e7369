"""Text LoRA for causal language models (transformers + peft)."""
