"""LoRA for ``nn.MultiheadAttention`` (open_clip text encoders: A1111's SD2 TE, SDXL's te2).

Hand-rolled because peft 0.21's MultiheadAttention layer merges the delta into the base
``in_proj_weight`` before every forward and subtracts it afterwards, re-registering new
Parameter objects: in fp16 the base weights drift a little on every call and the original
parameter objects are replaced, which breaks training a live WebUI model in place (the base must
come back bit-exact, same objects). This wrapper leaves the base module untouched and calls
``F.multi_head_attention_forward`` with ``W + delta``.

It keeps one LoRA per projection (q, k, v, out), the layout kohya files have for text encoders,
so the conversion to and from ``..._self_attn_{q,k,v,out}_proj`` keys is exact in both directions
at the same rank. LoRA dropout is not applied here (the delta is merged into the weight).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from lora_trainer.lora.kohya import MHA_PARTS


class LoraMultiheadAttention(nn.Module):
    """Wraps ``base`` (kept as ``.base``, untouched); parts: subset of ("q", "k", "v", "out")."""

    def __init__(self, base: nn.MultiheadAttention, ranks: dict[str, int], alphas: dict[str, float]) -> None:
        super().__init__()
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs query, key and value of the same size")
        self.base = base
        e = base.embed_dim
        dev = base.in_proj_weight.device
        self.lora_down = nn.ModuleDict()
        self.lora_up = nn.ModuleDict()
        for part in ranks:
            if part not in MHA_PARTS:
                raise ValueError(f"unknown attention part {part!r}")
            down = nn.Linear(e, ranks[part], bias=False, device=dev, dtype=torch.float32)
            up = nn.Linear(ranks[part], e, bias=False, device=dev, dtype=torch.float32)
            # Same start as peft: random down, zero up, so the LoRA begins as a no-op.
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            self.lora_down[part] = down
            self.lora_up[part] = up
        self.alphas = dict(alphas)
        self.multiplier = 1.0

    def scaling(self, part: str) -> float:
        return self.multiplier * self.alphas[part] / self.lora_down[part].weight.shape[0]

    def delta(self, part: str) -> torch.Tensor | None:
        if part not in self.lora_down:
            return None
        return (self.lora_up[part].weight @ self.lora_down[part].weight) * self.scaling(part)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.base
        e = b.embed_dim
        w_in, w_out = b.in_proj_weight, b.out_proj.weight
        if any(p in self.lora_down for p in ("q", "k", "v")):
            deltas = [self.delta(p) for p in ("q", "k", "v")]
            full = torch.cat([d if d is not None else w_in.new_zeros(e, e, dtype=torch.float32)
                              for d in deltas])
            w_in = w_in + full.to(w_in.dtype)
        d_out = self.delta("out")
        if d_out is not None:
            w_out = w_out + d_out.to(w_out.dtype)
        return w_in, w_out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = self.base
        if self.multiplier == 0.0:  # LoRA off: the base module itself, bit for bit
            return b(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        w_in, w_out = self._weights()
        batched = query.dim() == 3
        if b.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, b.embed_dim, b.num_heads, w_in, b.in_proj_bias, b.bias_k, b.bias_v,
            b.add_zero_attn, b.dropout, w_out, b.out_proj.bias, training=b.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if b.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights

    def __getattr__(self, name: str) -> Any:
        # Callers read MHA attributes (batch_first, embed_dim, ...) from the attention module.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base"), name)
