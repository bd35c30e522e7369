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


CHUNK = MAX_TOKENS - 2  # the tokens of a caption one pass of the encoder reads


def tokenize_weighted(tokenizer: Any, captions: list[str], device: torch.device,
                      chunks: int = 1, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of each caption in ``chunks`` rows of 77, as :func:`tokenize` lays one out (start
    token, up to 75 tokens, end token, padding; a caption is cut after 75 x chunks tokens, and a
    short one gets rows of start and end only), and each token's weight (1 for the start, end and
    padding tokens). ``weighted``: the caption read with the WebUI's emphasis syntax
    (``(word:1.2)``; the brackets leave the text), else as plain text. Rows of one caption follow
    each other: (len(captions) x chunks, 77)."""
    import torch

    from lora_trainer.data.emphasis import parse_emphasis

    rows, weights = [], []
    for caption in captions:
        ids: list[int] = []
        ws: list[float] = []
        for fragment, weight in parse_emphasis(caption) if weighted else [(caption, 1.0)]:
            inner = tokenizer(fragment, truncation=False, verbose=False).input_ids[1:-1]  # without start and end
            ids += inner
            ws += [weight] * len(inner)
        for n in range(chunks):
            part, part_w = ids[n * CHUNK:(n + 1) * CHUNK], ws[n * CHUNK:(n + 1) * CHUNK]
            pad = CHUNK - len(part)
            rows.append([tokenizer.bos_token_id, *part, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
            weights.append([1.0, *part_w, 1.0] + [1.0] * pad)
    return torch.tensor(rows, device=device), torch.tensor(weights, device=device)


def _joined(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """(B x chunks, 77, C) hidden states -> (B, chunks x 77, C): each caption's chunks one after
    another, as the WebUI joins a long prompt's."""
    return hidden.reshape(hidden.shape[0] // chunks, chunks * hidden.shape[1], *hidden.shape[2:])


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's hidden state times its weight, then the whole caption's scaled back to its
    mean before (kohya's weighted captions): emphasis moves weight between tokens."""
    import torch

    before = hidden.float().mean(dim=(-2, -1), keepdim=True)
    weighted = hidden.float() * weights.unsqueeze(-1)
    after = weighted.mean(dim=(-2, -1), keepdim=True)
    scale = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 1.0)  # a mean of 0 stays
    out = (weighted * scale).to(hidden.dtype)
    plain = (weights == 1).all(dim=-1).view(-1, *[1] * (hidden.dim() - 1))
    return torch.where(plain, hidden, out)  # a caption without emphasis: its very numbers


def encode_last_hidden(encoders: list[Any], tokenizers: list[Any], device: torch.device,
                       weighted: bool = False, chunks: int = 1) -> EncodeText:
    """SD1/SD2 conditioning; ``weighted``: emphasis read; ``chunks``: captions of up to 75 x
    chunks tokens, in that many passes of 77 joined (a context of 77 x chunks tokens)."""
    (te,), (tok,) = encoders, tokenizers

    def encode_text(captions: list[str]) -> Conditioning:
        if not weighted and chunks == 1:
            return {"context": te(tokenize(tok, captions, device), output_hidden_states=False).last_hidden_state}
        ids, weights = tokenize_weighted(tok, captions, device, chunks, weighted)
        hidden = _joined(te(ids, output_hidden_states=False).last_hidden_state, chunks)
        return {"context": apply_weights(hidden, weights.reshape(len(captions), -1))}

    return encode_text


def encode_sdxl(encoders: list[Any], tokenizers: list[Any], device: torch.device,
                weighted: bool = False, chunks: int = 1) -> EncodeText:
    """SDXL conditioning (see :func:`encode_last_hidden`); the pooled embedding is the first
    chunk's, unweighted."""
    import torch

    (te1, te2), (tok1, tok2) = encoders, tokenizers
    install_hidden_state_hooks(encoders, tokenizers, device)

    def hidden(te: Any, tok: Any, captions: list[str]) -> tuple[torch.Tensor, Any]:
        if not weighted and chunks == 1:
            out = te(tokenize(tok, captions, device), output_hidden_states=True)
            return out.hidden_states[-2], out.text_embeds if hasattr(out, "text_embeds") else None
        ids, weights = tokenize_weighted(tok, captions, device, chunks, weighted)
        out = te(ids, output_hidden_states=True)
        h = apply_weights(_joined(out.hidden_states[-2], chunks), weights.reshape(len(captions), -1))
        pooled = out.text_embeds[::chunks] if hasattr(out, "text_embeds") else None
        return h, pooled

    def encode_text(captions: list[str]) -> Conditioning:
        h1, _ = hidden(te1, tok1, captions)
        h2, pooled = hidden(te2, tok2, captions)
        return {"context": torch.cat([h1, h2.to(h1.dtype)], dim=-1), "pooled": pooled}

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
