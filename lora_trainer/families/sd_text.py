"""Text conditioning of the Stable Diffusion families over diffusers text encoders.

They mirror what the diffusers pipelines do at inference (``encode_prompt``), so a LoRA trained
on a bundle behaves the same when rendered by diffusers or by the WebUI:

- SD1: CLIP-L ``last_hidden_state``.
- SD2: the diffusers-format OpenCLIP-H text encoder already ends one layer early (23 of 24
  layers; single-file conversion drops the last block), so its ``last_hidden_state`` *is*
  OpenCLIP's penultimate layer followed by the final layer norm — what the WebUI and the
  original SD2 code feed the UNet. Taking ``hidden_states[-2]`` here would skip one more layer.
- SDXL: ``hidden_states[-2]`` of CLIP-L and of OpenCLIP-bigG (no final norm), concatenated on
  the channel axis; pooled = bigG's projected ``text_embeds``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when text is encoded: the families import without it
    import torch

MAX_TOKENS = 77
Conditioning = dict[str, "torch.Tensor"]
EncodeText = Callable[[list[str]], Conditioning]


def tokenize(tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(list(captions), max_length=MAX_TOKENS, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(device)


def encode_last_hidden(encoders: list[Any], tokenizers: list[Any], device: torch.device) -> EncodeText:
    (te,), (tok,) = encoders, tokenizers

    def encode_text(captions: list[str]) -> Conditioning:
        out = te(tokenize(tok, captions, device), output_hidden_states=False)
        return {"context": out.last_hidden_state}

    return encode_text


def encode_sdxl(encoders: list[Any], tokenizers: list[Any], device: torch.device) -> EncodeText:
    import torch

    (te1, te2), (tok1, tok2) = encoders, tokenizers
    install_hidden_state_hooks(encoders, tokenizers, device)

    def encode_text(captions: list[str]) -> Conditioning:
        out1 = te1(tokenize(tok1, captions, device), output_hidden_states=True)
        out2 = te2(tokenize(tok2, captions, device), output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2].to(out1.hidden_states[-2].dtype)], dim=-1)
        return {"context": context, "pooled": out2.text_embeds}

    return encode_text


def install_hidden_state_hooks(encoders: list[Any], tokenizers: list[Any], device: torch.device) -> None:
    """Run each encoder once with output_hidden_states before any LoRA is injected.

    transformers 5 installs its hidden-state capturing hooks on the first such call and marks the
    module with an attribute; a LoRA removal that restores the module's attributes as they were
    at injection drops that mark, the hooks get installed twice and ``hidden_states[-2]`` (what
    SDXL uses) silently points at the wrong layer. Installing them up front keeps them stable.
    """
    import torch

    with torch.no_grad():
        for te, tok in zip(encoders, tokenizers, strict=True):
            te(tokenize(tok, [""], device), output_hidden_states=True)
