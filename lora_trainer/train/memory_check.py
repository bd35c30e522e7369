"""Will this run fit? The memory estimate of a run as configured, checked before any long work.

The "auto" preset sizes a run to the card; a run set by hand (a larger batch, rank 128, block
ranks, LoCon, captions of 225 tokens, a trained text encoder) is estimated here with all of its
settings (:func:`run_estimate`): ``train --check`` and ``bench --estimate --config`` print it,
and a run on a GPU compares it with the memory there before it fills its caches
(:func:`memory_warning`), so a run that would stop at its first step says so minutes earlier.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_trainer.bench.estimate import MemoryEstimate, WeightsCast
    from lora_trainer.config import TrainConfig


def run_estimate(cfg: TrainConfig, arch: str, *, variant: str = "", captions_fixed: bool | None = None,
                 weights_cast: WeightsCast | None = None) -> MemoryEstimate:
    """The predicted peak of training ``cfg`` on a full-size ``arch`` model on a GPU: its
    resolution, batch, precision (``auto``: bf16), checkpointing, norms, network (type, rank,
    block and conv ranks, targets, LoKr factor, dropouts, text encoders), optimizer, caption
    length, and whether latents and text embeddings are cached (``captions_fixed``: whether the
    captions never change, as the dataset knows; None: as the config says, no shuffle and no tag
    dropout). ``weights_cast``: a host's UNet stored narrower than it computes."""
    from lora_trainer.bench.estimate import estimate_peak_memory
    from lora_trainer.families import get_family

    family = get_family(arch)
    t, d, n, m = cfg.train, cfg.data, cfg.network, cfg.model
    precision = {"no": "fp32", "auto": "bf16"}.get(t.mixed_precision, t.mixed_precision)
    if m.weight_dtype == "fp32" and not family.transformer_denoiser:
        precision = "fp32"  # frozen weights kept in fp32: counted as a full-precision run, never less
    return estimate_peak_memory(
        arch, -(-d.resolution // 8) * 8, t.batch_size, n.rank, precision, t.gradient_checkpointing,
        cache_latents=d.cache_latents != "off" and d.crop == "center" and not d.color_aug, variant=variant,
        weight_dtype=m.weight_dtype if m.weight_dtype in family.quantized_weights else "auto", network=n.type,
        weights_cast=weights_cast, checkpointing_share=t.checkpointing_share, fp32_norms=t.fp32_norms,
        **shaping(cfg, arch, captions_fixed))


def shaping(cfg: TrainConfig, arch: str, captions_fixed: bool | None = None) -> dict[str, Any]:
    """The estimate's arguments for what ``cfg`` sets beyond the resolution, batch, rank,
    precision, checkpointing and storage that the "auto" preset chooses: the network's other
    settings, a trained text encoder, the caption length, whether the captions are encoded once
    (``captions_fixed``: whether they never change, as the dataset knows; None: as the config
    says, no shuffle and no tag dropout) and the optimizer."""
    from lora_trainer.bench.adapters import network_args
    from lora_trainer.families import get_family

    d, n = cfg.data, cfg.network
    if captions_fixed is None:
        captions_fixed = not (d.shuffle_captions or d.tag_dropout)
    return {"train_text_encoder": n.train_text_encoder, "network_args": network_args(n),
            "token_chunks": 1 if get_family(arch).transformer_denoiser else d.token_chunks,
            "text_cached": d.cache_text_embeddings and captions_fixed, "optimizer": cfg.optim.optimizer}


def memory_fixes(cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` to change for a run that needs less memory, the most effective first."""
    t, d, n = cfg.train, cfg.data, cfg.network
    fixes = []
    if t.fp32_norms and t.mixed_precision != "no":
        fixes.append("turn off train.fp32_norms")
    if not t.gradient_checkpointing:
        fixes.append("turn on train.gradient_checkpointing")
    elif t.checkpointing_share < 1:
        fixes.append(f"raise train.checkpointing_share (now {t.checkpointing_share:g}) towards 1")
    if t.batch_size > 1:
        fixes.append(f"lower train.batch_size (now {t.batch_size})")
    if n.train_text_encoder:
        fixes.append("turn off network.train_text_encoder")
    fixes.append(f"lower data.resolution (now {d.resolution})")
    return fixes


def memory_warning(cfg: TrainConfig, est: MemoryEstimate, available_gb: float, device: str) -> str | None:
    """One line when the run of ``cfg`` (estimated ``est``) needs more than ``available_gb``, the
    memory of ``device`` it can use (free, and what its own model holds there); else None."""
    from lora_trainer.bench.estimate import needed_gb, round_up

    need = needed_gb(est)
    if need <= available_gb:
        return None
    return (f"memory: this run is estimated to need {round_up(need, 1):.1f} GiB of {device} at its peak and "
            f"{available_gb:.1f} GiB is there for it, so it will likely run out of memory; "
            f"{', or '.join(memory_fixes(cfg))}; the 'auto' preset picks settings that fit")


def available_gb(device: Any, modules: list[Any]) -> float | None:
    """The memory of the CUDA ``device`` a run can use: what is free there, and what ``modules``
    (the run's own model, which the estimate counts) hold there already; None for another device."""
    import torch

    from lora_trainer.bench.estimate import GiB

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    held = {id(t): t.numel() * t.element_size() for module in modules if module is not None
            for t in (*module.parameters(), *module.buffers())
            if t.device.type == "cuda" and device.index in (None, t.device.index)}
    return (free + sum(held.values())) / GiB


def describe(est: MemoryEstimate, arch: str) -> str:
    """The estimate of a run in one line: the peak and the phase that sets it."""
    from lora_trainer.bench.estimate import needed_gb, round_up

    training = est.weights_gb + est.lora_gb + est.step_gb
    phase = max((training, "the training step"), (est.caching_gb, "the latent caching"),
                (est.text_caching_gb, "the text caching"), (est.load_gb, "the model's load"))[1]
    return (f"memory: estimated peak {round_up(est.total_gb, 1):.1f} GiB on a GPU for full-size {arch} "
            f"({phase}; {round_up(needed_gb(est), 1):.1f} GiB free to be safe)")


def model_of(cfg: TrainConfig) -> tuple[str, str] | None:
    """(family, variant) of the model ``cfg`` trains, found without loading it: ``model.arch`` when
    set, else a single file's header or a diffusers folder's index. A family with variants whose
    variant is not known counts as its largest, so the estimate never says less. None for the
    embedded demo model (tiny) and a model that is not there or not known."""
    from pathlib import Path

    from lora_trainer.families import get_family
    from lora_trainer.models.checkpoint import model_of_file

    m = cfg.model
    if m.base_model == "demo":
        return None
    path = Path(m.base_model).expanduser()
    found = model_of_file(path) if path.is_file() else None
    if found is None and path.is_dir():
        from lora_trainer.errors import LoraTrainerError
        from lora_trainer.models.loaders import folder_family

        try:
            found = (folder_family(path).name, "")
        except LoraTrainerError:
            found = None
    arch = m.arch if m.arch != "auto" else found and found[0]
    if not arch:
        return None
    family = get_family(arch)
    variant = found[1] if found and found[0] == arch else ""
    if family.variants() and not variant:
        variant = max(family.variants(), key=lambda v: getattr(family, "denoiser_params", {}).get(v, 0))
    return arch, variant
