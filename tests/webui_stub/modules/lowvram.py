"""Stand-in for ``modules/lowvram.py`` (v1.10.1): --medvram/--lowvram placement."""

import torch

from modules import shared

module_in_gpu = None
cpu = torch.device("cpu")


def send_everything_to_cpu() -> None:
    global module_in_gpu
    if module_in_gpu is not None:
        module_in_gpu.to(cpu)
    module_in_gpu = None


def is_needed(sd_model) -> bool:
    return bool(shared.cmd_opts.lowvram or shared.cmd_opts.medvram
                or (shared.cmd_opts.medvram_sdxl and hasattr(sd_model, "conditioner")))


def is_enabled(sd_model) -> bool:
    return bool(getattr(sd_model, "lowvram", False))
