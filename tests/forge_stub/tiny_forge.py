"""Tiny Forge engines (``shared.sd_model`` in Forge Neo) on the real LDM UNet: SD1's topology and
SDXL's (3 levels, attention at the last two, a 2816-wide ``y``), widths shrunk; a Flux engine
that is only a name and a flow predictor. Written for the tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from backend import memory_management
from backend.diffusion_engine.base import ForgeDiffusionEngine, ForgeObjects
from backend.modules.k_model import KModel
from backend.modules.k_prediction import Prediction, PredictionFlux
from backend.operations import manual_cast
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from backend.patcher.vae import VAE
from ldm.modules.attention import BasicTransformerBlock as LdmTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from tiny_ldm import AutoencoderKL, sd1_alphas_cumprod, tiny_clip_text, tiny_sd1_unet, unzero

from lora_trainer.models.tokenizer import load_clip_tokenizer

SCALE = 0.18215


def checkpoint_info(name: str) -> SimpleNamespace:
    return SimpleNamespace(title=f"{name}.safetensors [0123abcd]", name=f"{name}.safetensors", model_name=name,
                           filename=f"/models/{name}.safetensors", sha256="2" * 64)


class BasicTransformerBlock(LdmTransformerBlock):
    """Forge's ``backend/nn/unet.py`` transformer block adds its residuals in place (``x += n``,
    from ComfyUI), unlike the LDM block it replaces; the same sums, written for the tests."""

    def _forward(self, x, context=None, transformer_options=None):
        n = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None)
        x += n
        n = self.attn2(self.norm2(x), context=context)
        x += n
        x_skip = x
        x = self.ff(self.norm3(x))
        x += x_skip
        return x


def forge_blocks(unet: torch.nn.Module) -> torch.nn.Module:
    """The LDM UNet with Forge's in-place transformer blocks."""
    for m in unet.modules():
        if type(m) is LdmTransformerBlock:
            m.__class__ = BasicTransformerBlock
    return unet


class Timestep(torch.nn.Module):
    """Forge's ``backend.nn.unet.Timestep``: a sinusoidal embedding of each number."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class _LdmEngine(ForgeDiffusionEngine):
    """What SD1 and SDXL engines share: a UnetPatcher over KModel, CLIP-L, the VAE."""

    def __init__(self, unet: torch.nn.Module, name: str, seed: int, storage_dtype=torch.float32) -> None:
        torch.manual_seed(seed + 1)
        clip = CLIP({"clip_l": tiny_clip_text()}, {"clip_l": load_clip_tokenizer()})
        vae = VAE(AutoencoderKL())
        unet = forge_blocks(unet).to(storage_dtype)
        if storage_dtype != torch.float32:  # Forge's loader: manual cast when storage != computation
            manual_cast(unet)
        kmodel = KModel(unet, Prediction(sd1_alphas_cumprod()), computation_dtype=torch.float32)
        super().__init__(ForgeObjects(UnetPatcher(kmodel, torch.device("cpu"), torch.device("cpu")), clip, vae))
        self.sd_checkpoint_info = checkpoint_info(name)
        self.sd_model_hash = "0123abcd"

    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        clip = self.forge_objects.clip
        memory_management.load_model_gpu(clip.patcher)
        tok = clip.tokenizer["clip_l"](list(prompts), truncation=True, max_length=77, padding="max_length",
                                       return_tensors="pt")
        out = clip.cond_stage_model["clip_l"](input_ids=tok["input_ids"])
        return out.last_hidden_state, out.pooler_output

    @torch.inference_mode()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return (self.forge_objects.vae.encode(x) * SCALE).to(x)

    @torch.inference_mode()
    def decode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        return self.forge_objects.vae.decode(x / SCALE).to(x)


class StableDiffusion(_LdmEngine):
    def __init__(self, seed: int = 0, name: str = "tiny-forge-sd1", storage_dtype=torch.float32) -> None:
        super().__init__(tiny_sd1_unet(seed), name, seed, storage_dtype)
        self.is_sd1 = True

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]) -> torch.Tensor:
        return self._text(prompt)[0]


class SDXLUNet(UNetModel):
    """The LDM UNet with SDXL's ``label_emb`` (the 2816-wide ``y``: pooled text + sizes), which
    the installed LDM code predates; the forward is the plain UNet pass with ``y`` added."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        dim = self.model_channels * 4
        self.label_emb = torch.nn.Sequential(torch.nn.Linear(2816, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels)) + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


def tiny_sdxl_unet(seed: int = 0) -> UNetModel:
    """SDXL's topology (3 levels, attention at levels 2 and 3, linear projections), width 32."""
    torch.manual_seed(seed)
    unet = SDXLUNet(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                    attention_resolutions=[2, 4], channel_mult=(1, 2, 2), num_head_channels=8,
                    use_spatial_transformer=True, transformer_depth=1, context_dim=32, use_checkpoint=False,
                    use_linear_in_transformer=True, legacy=False)
    return unzero(unet)


class StableDiffusionXL(_LdmEngine):
    def __init__(self, seed: int = 0, name: str = "tiny-forge-sdxl") -> None:
        super().__init__(tiny_sdxl_unet(seed), name, seed)
        self.embedder = Timestep(256)
        torch.manual_seed(seed + 2)
        self.pool_proj = torch.nn.Linear(32, 1280)  # stands for CLIP-G's pooled output
        self.is_sdxl = True

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt: list[str]) -> dict[str, torch.Tensor]:
        context, pooled = self._text(prompt)
        sizes = [1024, 1024, 0, 0, 1024, 1024]
        flat = torch.cat([self.embedder(torch.tensor([float(v)])) for v in sizes], dim=1)
        pooled = self.pool_proj(pooled)
        return {"crossattn": context, "vector": torch.cat([pooled, flat.repeat(len(prompt), 1)], dim=1)}


class Flux(ForgeDiffusionEngine):
    """A flow model Forge Neo loads (we cannot train it): a name and a flow predictor."""

    def __init__(self, name: str = "flux1-dev") -> None:
        kmodel = KModel(torch.nn.Linear(4, 4), PredictionFlux())
        super().__init__(ForgeObjects(UnetPatcher(kmodel, "cpu", "cpu"), None, None))
        self.sd_checkpoint_info = checkpoint_info(name)

