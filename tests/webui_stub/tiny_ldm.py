"""A tiny SD1 model as the A1111 WebUI (v1.10.1) holds it in ``shared.sd_model``.

Built from the WebUI's real LDM classes (``stable-diffusion-sdkit``: openaimodel ``UNetModel``,
the autoencoder's ``Encoder``/``Decoder`` and ``DiagonalGaussianDistribution``) at SD1's
topology with shrunk widths: 4 levels, 2 res blocks, attention at the first three levels,
context 32, VAE factor 8, VAE ch 32. ``LatentDiffusion``/``AutoencoderKL`` themselves need
pytorch_lightning, so thin modules with the same attribute names and methods hold the parts:
``model.diffusion_model``, ``first_stage_model``, ``cond_stage_model.wrapped.transformer``
(a transformers CLIPTextModel laid out as transformers 4.30 has it, with ``text_model.*``).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from lora_trainer.models.tokenizer import load_clip_tokenizer


class CLIPTextModel430(nn.Module):
    """transformers 4.30's CLIPTextModel layout (``.text_model.encoder.layers...``) on any version."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.text_model = CLIPTextModel(config)
        if hasattr(self.text_model, "text_model"):  # transformers 4.x already nests it
            self.text_model = self.text_model.text_model

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False):
        return self.text_model(input_ids=input_ids, output_hidden_states=output_hidden_states)


class FrozenCLIPEmbedder(nn.Module):
    """Like ldm's FrozenCLIPEmbedder: ``.tokenizer``, ``.transformer``, max_length 77."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = load_clip_tokenizer()
        self.transformer = transformer
        self.max_length = 77


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """Like A1111's sd_hijack_clip wrapper: ``.wrapped``; forward(texts) -> (B, 77, C)."""

    def __init__(self, wrapped: FrozenCLIPEmbedder) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts: list[str]) -> torch.Tensor:
        tok = self.wrapped.tokenizer(texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
        device = next(self.wrapped.transformer.parameters()).device
        return self.wrapped.transformer(input_ids=tok["input_ids"].to(device)).last_hidden_state


class AutoencoderKL(nn.Module):
    def __init__(self, ch: int = 32) -> None:
        super().__init__()
        dd = dict(ch=ch, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=[], in_channels=3,
                  resolution=64, z_channels=4, double_z=True)
        self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
        self.quant_conv, self.post_quant_conv = nn.Conv2d(8, 8, 1), nn.Conv2d(4, 4, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel) -> None:
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


def tiny_sd1_unet(seed: int = 0) -> UNetModel:
    """SD1's UNet topology at width 32 (context 32), with no zero-initialised weights."""
    torch.manual_seed(seed)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                     attention_resolutions=[4, 2, 1], channel_mult=(1, 2, 4, 4), num_heads=8,
                     use_spatial_transformer=True, transformer_depth=1, context_dim=32, use_checkpoint=False,
                     legacy=False)
    return unzero(unet)


def unzero(unet: nn.Module) -> nn.Module:
    # ldm zero-initialises output convs and attention out-projections (a fresh model predicts
    # 0 everywhere, and no LoRA could change that); a checkpoint never has them at zero.
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    return unet


def tiny_clip_text() -> CLIPTextModel430:
    return CLIPTextModel430(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                           num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                           projection_dim=32, bos_token_id=49406, eos_token_id=49407))


def sd1_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class TinyLatentDiffusion(nn.Module):
    """The attributes and methods of LatentDiffusion that the WebUI and lora-trainer use."""

    def __init__(self, seed: int = 0, parameterization: str = "eps") -> None:
        super().__init__()
        self.model = DiffusionWrapper(tiny_sd1_unet(seed))
        self.first_stage_model = AutoencoderKL()
        self.cond_stage_model = FrozenCLIPEmbedderWithCustomWords(FrozenCLIPEmbedder(tiny_clip_text()))
        self.register_buffer("alphas_cumprod", sd1_alphas_cumprod())
        self.alphas_cumprod_original = self.alphas_cumprod
        self.scale_factor = 0.18215
        self.parameterization = parameterization
        self.is_sd1, self.is_sd2, self.is_sdxl, self.is_sd3 = parameterization == "eps", parameterization == "v", False, False
        self.latent_channels = 4
        self.lowvram = False
        self.sd_model_hash = "abcdef12"
        self.sd_checkpoint_info = SimpleNamespace(model_name="tiny-sd1", name="tiny-sd1.safetensors", sha256="0" * 64)
        # The "checkpoint file": what reload_model_weights restores (kept out of the module state).
        self.__dict__["_checkpoint"] = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def get_learned_conditioning(self, c: list[str]) -> torch.Tensor:
        return self.cond_stage_model(c)

    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution) -> torch.Tensor:
        return self.scale_factor * encoder_posterior.sample()

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def reload_from_checkpoint(self) -> None:
        self.load_state_dict(self.__dict__["_checkpoint"])
