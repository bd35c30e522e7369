"""Shared checks of the rectified-flow families' tests (Flux.1, SD3.5) on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_trainer.families.flow_parts import block_linear_targets
from lora_trainer.lora.dit_keys import dit_lora_key
from lora_trainer.models.bundle import ModelBundle
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config


def fixed_image_latents(bundle: ModelBundle, data: Path) -> tuple[torch.Tensor, str]:
    from lora_trainer.data.captions import read_metadata_csv
    from lora_trainer.data.dataset import pil_to_tensor
    from lora_trainer.data.images import open_image_rgb

    img = pil_to_tensor(open_image_rgb(data / "demo_000.png").resize((64, 64)))[None]
    with torch.no_grad():
        return bundle.encode_images(img), read_metadata_csv(data / "metadata.csv")["demo_000.png"]


@torch.no_grad()
def eval_loss(bundle: ModelBundle, latents: torch.Tensor, caption: str, extra: dict[str, torch.Tensor]) -> float:
    """Flow-matching loss at fixed sigmas and noise: lower when the model has learnt the image."""
    gen = torch.Generator().manual_seed(7)
    total = 0.0
    cond = {**bundle.encode_text([caption]), **extra}
    for sigma in (0.25, 0.5, 0.75):
        noise = torch.randn(latents.shape, generator=gen)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = bundle.predict(noisy, torch.tensor([sigma]), cond, None)
        total += float(torch.nn.functional.mse_loss(pred, noise - latents))
    return total / 3


def train_memorises(bundle: ModelBundle, tmp: Path, extra: dict[str, torch.Tensor], steps: int = 60,
                    **values: Any) -> tuple[float, float, Any, TinyHost]:
    """Train on one image (text cached, a sample at the end); the eval loss before and after
    (the saved file read back into fresh LoRA layers), the result and the host."""
    from lora_trainer.lora.inject import inject_lora

    one = make_data(tmp / "one", n=1)
    cfg = tiny_config(one, tmp / "out", **{"train.max_train_steps": steps, "optim.learning_rate": 1e-2,
                                           "output.save_precision": "fp32", "sample.prompt": "a red circle",
                                           "sample.steps": 3, **values})
    latents, caption = fixed_image_latents(bundle, one)
    before = eval_loss(bundle, latents, caption, extra)
    host = TinyHost(bundle=bundle)
    result = Trainer(cfg, host=host).run()
    net = inject_lora(bundle, cfg.network)
    try:
        net.load_kohya(lora_tensors(result.lora_path))
        after = eval_loss(bundle, latents, caption, extra)
    finally:
        net.remove()
    return before, after, result, host


def expected_unet_keys(family: str, bundle: ModelBundle) -> set[str]:
    return {dit_lora_key(family, "unet", p) for p in block_linear_targets(bundle.unet)}


def module_keys(path: Path) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_tensors(path)}


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls
