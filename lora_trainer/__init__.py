"""lora-trainer: train LoRA adapters for Stable Diffusion (and causal language models).

The package imports and runs with no WebUI present; only ``lora_trainer.hosts.a1111`` and
``lora_trainer.hosts.forge`` touch the WebUI's ``modules`` package, and only lazily.
"""

__version__ = "0.1.0"
