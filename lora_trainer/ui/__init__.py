"""The host-agnostic Train LoRA tab and the standalone app."""
