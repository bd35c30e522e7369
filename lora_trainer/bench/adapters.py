"""Adapters on the models the memory estimate traces (on ``meta``) and its CPU check runs.

Either kohya's default targets with the trainer's peft configs (:func:`add_network`, the
bench's rows), or a run's whole network settings placed by the trainer's own injection
(:func:`adapt_as_trainer`, from :func:`network_args`), with the text encoders it trains
(:func:`trained_text_encoders`), which then run in the step (:func:`text_conditioning`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lora_trainer.families import get_family


def materialize(model: nn.Module, device: str) -> nn.Module:
    """A meta model on ``device`` with random weights (what a step allocates does not depend on
    them); on "meta" itself unchanged."""
    if device == "meta":
        return model
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        for b in model.buffers():
            b.zero_()
    return model


def add_network(model: nn.Module, paths: list[str], rank: int, network: str, device: str) -> int:
    """Put ``network`` adapters (lora, locon, dora, loha, lokr: the trainer's own peft configs and
    DoRA layer, at alpha = rank) on ``paths`` of the frozen ``model``, with fp32 weights as the
    trainer keeps them and the only trainable parameters; returns their parameter count. Each
    kind then allocates in a step what it does in training (LoHa / LoKr build a full-size delta
    weight per layer, DoRA a normalised fp32 weight)."""
    from peft import inject_adapter_in_model

    from lora_trainer.lora.variants import ADAPTER_PARAM_MARKS, peft_config, wrap_dora

    kind = "lora" if network == "locon" else network
    with torch.device(device):
        inject_adapter_in_model(peft_config(kind, rank, float(rank), paths, {}, {}, 0.0), model)
        if kind == "dora":
            wrap_dora(model, paths)
    count = 0
    for n, p in model.named_parameters():
        trains = any(mark in n for mark in ADAPTER_PARAM_MARKS)
        if trains:
            p.data = p.data.float()
            count += p.numel()
        p.requires_grad_(trains)
    return count


# The network settings that change where adapters go, their sizes or what a step keeps for them,
# as (field, value) pairs of ``network.*`` (hashable: part of a traced step's key).
NetworkArgs = tuple[tuple[str, Any], ...]
_SHAPING_FIELDS = ("conv_rank", "block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight",
                   "block_lr_zero_threshold", "target_modules", "lokr_factor", "lokr_decompose_both", "dropout",
                   "rank_dropout", "module_dropout", "train_text_encoder", "lycoris_preset",
                   "init_from")


def network_args(net: Any) -> NetworkArgs:
    """The fields of the run's ``NetworkConfig`` that shape its adapters, where they differ from
    the defaults (the type and rank are arguments of their own; alphas change no memory; with
    ``init_from`` the trainer places that file's modules at its ranks)."""
    from lora_trainer.config import NetworkConfig

    default = NetworkConfig()
    pairs = [(f, tuple(v) if isinstance(v, list) else v) for f in _SHAPING_FIELDS
             if (v := getattr(net, f)) != getattr(default, f)]
    if net.type == "lokr":  # LyCORIS' options of the other kinds change nothing
        return tuple(pairs)
    return tuple((f, v) for f, v in pairs if not f.startswith("lokr_"))


def _meta_bundle(arch: str, denoiser: nn.Module, text_encoders: list[tuple[str, nn.Module]]) -> Any:
    """A model bundle of ``denoiser`` (diffusers naming) and Hugging Face CLIP ``text_encoders``
    for the trainer's LoRA injection, which reads nothing else of it."""
    from lora_trainer.models.bundle import ModelBundle, TextEncoderPart

    def unused(*_: Any) -> Any:
        raise RuntimeError("a model bundle for the memory estimate does not encode or predict")

    return ModelBundle(arch, "epsilon", denoiser, "diffusers",
                       [TextEncoderPart(key, te, "hf_clip") for key, te in text_encoders], None,
                       torch.zeros(1000), unused, unused, unused)


def adapt_as_trainer(model: nn.Module, arch: str, rank: int, network: str, args: NetworkArgs, device: str,
                     text_encoders: TextEncoders = ()) -> int:
    """Put the run's adapters on ``model`` (the frozen denoiser) with the trainer's own injection,
    for the network settings ``args`` (:func:`network_args`) of type ``network`` at ``rank``;
    with ``train_text_encoder``, on ``text_encoders`` too (:func:`trained_text_encoders`).
    Returns the trainable parameter count, fp32 as the trainer keeps them."""
    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.inject import inject_lora

    fields = {f: list(v) if isinstance(v, tuple) else v for f, v in args}
    cfg = NetworkConfig(type=network, rank=rank, alpha=float(rank), **fields)
    with torch.device(device):
        net = inject_lora(_meta_bundle(arch, model, list(text_encoders)), cfg)
    return sum(p.numel() for p in net.parameters())


# (kohya key, Hugging Face CLIP text model) of a UNet family's text encoders
TextEncoders = Sequence[tuple[str, nn.Module]]


def trained_text_encoders(arch: str, size: str, dtype: torch.dtype, args: NetworkArgs,
                          device: str = "meta") -> TextEncoders:
    """The CLIP text encoders of a UNet family, frozen weights in ``dtype`` on ``device``, when
    the network settings ``args`` train them (they are then part of every step); else none."""
    from lora_trainer.lora.layout import meta_text_encoders

    family = get_family(arch)
    if family.transformer_denoiser or not dict(args).get("train_text_encoder"):
        return []
    return [(key, materialize(te.to(dtype), device).requires_grad_(False))
            for key, te in meta_text_encoders(family, size)]


def text_conditioning(text_encoders: TextEncoders, batch: int, chunks: int, device: str) -> torch.Tensor:
    """What trained ``text_encoders`` give the denoiser for a batch of captions of ``chunks`` x 77
    tokens, computed as a step computes it (with the graph to their adapters): each chunk
    encoded, the encoders' states side by side, the chunks one after the other."""
    ids = torch.zeros(batch * chunks, 77, dtype=torch.long, device=device)
    states = torch.cat([te(ids).last_hidden_state for _, te in text_encoders], dim=-1)
    return states.reshape(batch, chunks * 77, states.shape[-1])
