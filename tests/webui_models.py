"""SD1, SD2 and SDXL shaped models as A1111 v1.10.1 holds them in ``shared.sd_model``.

Small modules with exactly the attribute paths the WebUI has (no weights to speak of): SD2's
open_clip text encoder under ``cond_stage_model.wrapped``, SDXL's ``conditioner.embedders``
(CLIP-L, OpenCLIP bigG, then the size embedders). The SDXL stand-in of the tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class OpenClipText(nn.Module):
    """open_clip's text tower layout: ``transformer.resblocks.N.attn`` (MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([nn.Module() for _ in range(2)])
        for rb in self.transformer.resblocks:
            rb.attn = nn.MultiheadAttention(8, 2)


class OpenClipEmbedder(nn.Module):  # ldm FrozenOpenCLIPEmbedder: ``.model``
    def __init__(self) -> None:
        super().__init__()
        self.model = OpenClipText()


class HFText(nn.Module):  # transformers 4.30 CLIPTextModel layout
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.Linear(4, 4)


class ClipEmbedder(nn.Module):  # ldm/sgm FrozenCLIPEmbedder: ``.transformer``
    def __init__(self) -> None:
        super().__init__()
        self.transformer = HFText()


class Wrapped(nn.Module):  # A1111's sd_hijack wrappers: ``.wrapped``
    def __init__(self, inner: nn.Module, input_key: str = "txt") -> None:
        super().__init__()
        self.wrapped, self.input_key = inner, input_key


class SizeEmbedder(nn.Module):  # sgm ConcatTimestepEmbedderND: (B, 2) -> (B, 512)
    def __init__(self, key: str) -> None:
        super().__init__()
        self.input_key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(256, dim=1)


class CaptureUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.seen: dict = {}

    def forward(self, x, t, context=None, y=None):
        self.seen = {"context": context, "y": y}
        return x * self.w


def make_model(arch: str, parameterization: str = "eps") -> nn.Module:
    m = nn.Module()
    m.model = nn.Module()
    m.model.diffusion_model = CaptureUNet()
    m.first_stage_model = nn.Conv2d(3, 4, 1)
    if arch == "sdxl":
        m.conditioner = nn.Module()
        m.conditioner.embedders = nn.ModuleList(
            [Wrapped(ClipEmbedder()), Wrapped(OpenClipEmbedder())]
            + [SizeEmbedder(k) for k in ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")])
        m.get_learned_conditioning = lambda c: {"crossattn": torch.zeros(len(c), 77, 2048),
                                                "vector": torch.arange(2816.0).repeat(len(c), 1)}
    else:
        m.cond_stage_model = Wrapped(OpenClipEmbedder() if arch == "sd2" else ClipEmbedder())
        m.get_learned_conditioning = lambda c: torch.zeros(len(c), 77, 1024)
    m.is_sd1, m.is_sd2, m.is_sdxl = arch == "sd1", arch == "sd2", arch == "sdxl"
    m.parameterization = parameterization
    m.alphas_cumprod = torch.full((1000,), 0.5, dtype=torch.float16)  # overridden (downcast) by the WebUI
    m.alphas_cumprod_original = torch.linspace(0.999, 0.01, 1000)
    m.sd_checkpoint_info = SimpleNamespace(title=f"tiny-{arch}.safetensors [0123abcd]", name=f"tiny-{arch}.safetensors",
                                           model_name=f"tiny-{arch}", sha256="1" * 64)
    return m
