"""What a training run returns, and the seeding it starts with: shared by the Trainer and its session."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class TrainResult:
    lora_path: Path | None
    steps: int
    final_loss: float | None
    stopped: bool
    output_dir: Path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
