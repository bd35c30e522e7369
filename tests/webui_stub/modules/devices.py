"""Stand-in for ``modules/devices.py`` (v1.10.1): the compute device and dtypes."""

import gc

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
device_interrogate = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
fp8 = False


def torch_gc() -> None:
    gc.collect()
