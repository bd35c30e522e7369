"""LoRA injection (peft), the kohya file format (pure mapping tables) and metadata."""
