"""Tiny FLUX.1 and SD3.5 models built from config, for tests and CPU benchmarks.

They keep the real block structure (double/joint and single blocks, 16 latent channels, the VAE's
factor 8, CLIP + T5 text encoders) and shrink the widths, so module paths (and LoRA keys) match
the full-size models'. Weights are random, seeded. T5's tokenizer is a small Unigram model built
with the ``tokenizers`` library (the real vocabulary ships with no package here).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.families.flow_tiny_configs import (
    flow_vae_config,
    flux_transformer_config,
    sd3_transformer_config,
)

if TYPE_CHECKING:
    pass


T5_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "circle", "square", "triangle",
            "on", "in", "with", "and", "white", "black", "background", "shape", "demo", "sks")
T5_MAX_LENGTH = 16


def t5_tokenizer_files(folder: str | Path) -> Path:
    """Write a tiny T5-style tokenizer (Unigram, ``</s>`` appended, ``<pad>`` = 0) to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.'-_"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -2.0) for w in T5_WORDS] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=512)
    folder = Path(folder)
    fast.save_pretrained(str(folder))
    return folder


def t5_config(d_model: int = 32, vocab_size: int = 128) -> dict[str, Any]:
    return dict(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, dropout_rate=0.0,
                is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)


def _sharp_vae(vae: Any) -> Any:
    """A random VAE's posterior is as wide as its mean: make it near-deterministic (log variance
    -30), so an image encodes to the same latents twice and tests can compare losses."""
    import torch

    conv, c = vae.encoder.conv_out, vae.config.latent_channels
    with torch.no_grad():
        conv.weight[c:] = 0
        conv.bias[c:] = -30
    return vae


def build_components(family: str, variant: str, tokenizer_dir: str | Path, seed: int = 0) -> dict[str, Any]:
    """Pipeline parts of a tiny "flux1" (dev/schnell) or "sd3" (medium/large) model; the T5
    tokenizer is written to ``tokenizer_dir``. ``t5_max_length`` is kept short for speed."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from lora_trainer.models.tiny import text_config
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    torch.manual_seed(seed)
    t5_tok = AutoTokenizer.from_pretrained(str(t5_tokenizer_files(tokenizer_dir)), local_files_only=True)
    parts: dict[str, Any] = {"vae": _sharp_vae(AutoencoderKL(**flow_vae_config(family))), "tokenizer": load_clip_tokenizer(),
                             "t5_max_length": T5_MAX_LENGTH}
    if family == "flux1":
        parts["transformer"] = FluxTransformer2DModel(**flux_transformer_config(variant))
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_config("quick_gelu")))
        parts["text_encoder_2"] = T5EncoderModel(T5Config(**t5_config(32)))
        parts["tokenizer_2"] = t5_tok
    else:
        parts["transformer"] = SD3Transformer2DModel(**sd3_transformer_config(variant))
        parts["text_encoder"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_config("quick_gelu")))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**text_config("gelu")))
        parts["text_encoder_3"] = T5EncoderModel(T5Config(**t5_config(96)))  # wider than CLIP-L + G: padded
        parts["tokenizer_2"] = load_clip_tokenizer(pad_token="!")
        parts["tokenizer_3"] = t5_tok
    return parts


def build_bundle(family: str, variant: str, tokenizer_dir: str | Path, seed: int = 0,
                 weight_dtype: str = "auto") -> Any:
    """A tiny ModelBundle of ``family``/``variant`` on the CPU in fp32."""
    import torch

    parts = build_components(family, variant, tokenizer_dir, seed)
    if family == "flux1":
        from lora_trainer.families.flux import flux_bundle

        return flux_bundle(parts, torch.device("cpu"), torch.float32, f"tiny-flux1-{variant}", weight_dtype)
    from lora_trainer.families.sd3 import sd3_bundle

    return sd3_bundle(parts, torch.device("cpu"), torch.float32, f"tiny-sd3-{variant}", weight_dtype)
