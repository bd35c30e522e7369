"""Presets by GPU memory: a table of {field path: value} per size, and "auto" that picks one.

The values are conservative starting points for SD1.x/SD2.x at 512-768 px (LoRA on the UNet,
frozen text encoder, cached latents); a family changes what it needs on top
(:meth:`Family.preset_overrides`: SDXL at 1024 px). A preset only sets the fields it names,
everything else keeps what the user chose.
"""

from __future__ import annotations

from typing import Any

from lora_trainer.families import DEFAULT_FAMILY, get_family

PRESET_NAMES = ["auto", "cpu (demo)", "6 GB", "8 GB", "12 GB", "16 GB", "24 GB"]
# Fields only "auto" sets: the denoiser's storage (fp8 / nf4 when Flux.1 / SD3.5 need it to fit).
AUTO_ONLY_FIELDS = ["model.weight_dtype"]

_COMMON: dict[str, Any] = {
    "data.cache_latents": "memory",
    "data.cache_text_embeddings": True,
    "network.train_unet": True,
    "network.train_text_encoder": False,
    "optim.optimizer": "adamw",
    "train.checkpointing_share": 1.0,  # every block, where a preset turns checkpointing on ("auto" may pick less)
}

# gigabytes -> settings; "mixed_precision" fp16 is the safe choice on every CUDA card
_BY_VRAM: dict[int, dict[str, Any]] = {
    6: {"data.resolution": 512, "train.batch_size": 1, "network.rank": 8, "network.alpha": 4.0,
        "train.gradient_checkpointing": True, "train.mixed_precision": "fp16", "optim.learning_rate": 1e-4},
    8: {"data.resolution": 512, "train.batch_size": 1, "network.rank": 16, "network.alpha": 8.0,
        "train.gradient_checkpointing": True, "train.mixed_precision": "fp16", "optim.learning_rate": 1e-4},
    12: {"data.resolution": 512, "train.batch_size": 2, "network.rank": 16, "network.alpha": 8.0,
         "train.gradient_checkpointing": False, "train.mixed_precision": "fp16", "optim.learning_rate": 1e-4},
    16: {"data.resolution": 768, "train.batch_size": 2, "network.rank": 32, "network.alpha": 16.0,
         "train.gradient_checkpointing": False, "train.mixed_precision": "fp16", "optim.learning_rate": 1e-4},
    24: {"data.resolution": 768, "train.batch_size": 4, "network.rank": 32, "network.alpha": 16.0,
         "train.gradient_checkpointing": False, "train.mixed_precision": "bf16", "optim.learning_rate": 1e-4},
}

# CPU: the tiny demo model at 64 px, a run of 60 steps that finishes in well under a minute and
# teaches it the demo dataset's pink (the settings of the ``demo`` command).
_CPU: dict[str, Any] = {
    "data.resolution": 64, "data.min_bucket_reso": 64, "data.max_bucket_reso": 128, "data.bucket_step": 32,
    "data.min_image_size": 32,
    "train.batch_size": 4, "train.max_train_steps": 60, "train.mixed_precision": "no",
    "train.gradient_checkpointing": False, "network.rank": 4, "network.alpha": 4.0,
    "optim.learning_rate": 3e-3, "optim.lr_scheduler": "constant",
    "sample.every_n_steps": 15, "sample.steps": 20, "sample.width": 64, "sample.height": 64,
}


def _cuda_memory_gb(which: int) -> float | None:
    """(free, total)[which] memory of the current CUDA device in GB, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info()[which] / 2**30
    except Exception:  # noqa: BLE001 - a broken driver means "no usable GPU" here
        return None


def gpu_memory_gb() -> float | None:
    """Total memory of the current CUDA device in GB, or None without one."""
    return _cuda_memory_gb(1)


def gpu_free_gb() -> float | None:
    """Free memory of the current CUDA device in GB, or None without one."""
    return _cuda_memory_gb(0)


def auto_preset(memory_gb: float | None = None, *, detect: bool = True) -> str:
    """The largest preset that fits ``memory_gb`` (detected when not given); "cpu (demo)" without a GPU."""
    if memory_gb is None and detect:
        memory_gb = gpu_memory_gb()
    if memory_gb is None:
        return "cpu (demo)"
    # cards report a little less than their label (a "8 GB" card shows ~7.6 GiB)
    fitting = [size for size in sorted(_BY_VRAM) if size <= memory_gb + 0.75]
    return f"{fitting[-1] if fitting else 6} GB"


def _mixed_precision(compute_dtype: str | None) -> str:
    """``train.mixed_precision`` for a host's model that computes in ``compute_dtype``: its own
    precision (fp16/bf16 autocast, or none for fp32, a WebUI started with ``--no-half``), so
    autocast never casts a frozen weight at every call and autograd never keeps those casts (the
    UNet once more, which the estimate does not count); without a host's model bf16 where the
    card has it, fp16 otherwise."""
    import torch

    if compute_dtype in ("fp16", "bf16"):
        return compute_dtype
    if compute_dtype == "fp32":
        return "no"
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp16"


def auto_values(arch: str, free_gb: float, model_resident: bool = False, network: str = "lora",
                weights_cast: tuple[str, str] | None = None, compute_dtype: str | None = None,
                latents_cached: bool = True, form: Any = None) -> dict[str, Any]:
    """The fastest settings the memory estimator predicts to fit ``free_gb`` (minus a reserve for
    the host) with ``network`` adapters: no gradient checkpointing, else the smallest share of the
    denoiser's blocks checkpointed that fits, with the largest batch that fits then; for Flux.1 / SD3.5 the transformer's weights stored in fp8 or nf4 when bf16 ones do
    not fit. ``weights_cast``: the host casts narrow-stored UNet weights per call
    (``LoadedModel.weights_cast``); ``compute_dtype``: the dtype the host's model computes in;
    ``latents_cached``: False when the form's random crops or color augmentation make every step
    encode its images (the VAE is then part of the step); ``form``: the form's config, whose
    settings the preset leaves as they are (block and conv ranks, targets, LoKr factor, dropouts,
    caption length, shuffled captions) are sized with it (:func:`_form_extras`)."""
    precision = _mixed_precision(compute_dtype)
    c = _auto_choice(arch, free_gb, model_resident, network, weights_cast, precision, latents_cached, form)
    return {**_COMMON, "data.resolution": c["resolution"], "train.batch_size": c["batch_size"],
            "train.gradient_checkpointing": c["gradient_checkpointing"],
            "train.checkpointing_share": c["checkpointing_share"], "network.rank": c["rank"],
            "model.weight_dtype": c["weight_dtype"],
            "network.alpha": c["rank"] / 2, "train.mixed_precision": precision, "optim.learning_rate": 1e-4}


def _auto_choice(arch: str, free_gb: float, model_resident: bool, network: str,
                 weights_cast: tuple[str, str] | None, precision: str, latents_cached: bool = True,
                 form: Any = None) -> dict[str, Any]:
    from lora_trainer.bench.estimate import choose_settings

    return choose_settings(free_gb, arch, precision="fp32" if precision == "no" else precision,
                           model_resident=model_resident, network=network, weights_cast=weights_cast,
                           cache_latents=latents_cached, extras=_form_extras(arch, form))


def _form_extras(arch: str, form: Any) -> dict[str, Any]:
    """What the form's config (None: none) adds to the estimate once a preset has set its values
    (text encoder frozen, AdamW, text embeddings cached): the settings a preset leaves alone."""
    if form is None:
        return {}
    from lora_trainer.config import build_config
    from lora_trainer.train.memory_check import shaping

    return shaping(build_config(_COMMON, base=form), arch)


def auto_summary(arch: str, free_gb: float | None, model_resident: bool = False, network: str = "lora",
                 weights_cast: tuple[str, str] | None = None, compute_dtype: str | None = None,
                 latents_cached: bool = True, form: Any = None) -> str:
    """One line on what "auto" chose for ``free_gb`` and why: the settings that set the memory,
    the estimate, and what to change when even the smallest settings are estimated not to fit."""
    from lora_trainer.bench.estimate import round_up

    if free_gb is None:
        return "auto: no GPU found, so the CPU demo settings"
    c = _auto_choice(arch, free_gb, model_resident, network, weights_cast, _mixed_precision(compute_dtype),
                     latents_cached, form)
    share = c["checkpointing_share"]
    ckpt = ("no gradient checkpointing" if not c["gradient_checkpointing"] else
            "gradient checkpointing of every block" if share >= 1 else
            f"gradient checkpointing of {share:.0%} of the blocks")
    weights = "" if c["weight_dtype"] == "auto" else f", weights stored in {c['weight_dtype']}"
    head = f"auto, for {free_gb:.1f} GiB free: {c['resolution']} px, batch {c['batch_size']}, {ckpt}{weights}"
    peak = f"{round_up(c['estimated_peak_gb'], 1):.1f}"
    if not c["fits"]:
        return (f"{head}: even these are estimated to need {peak} GiB at the peak, more than is free; lower "
                "data.resolution or network.rank, or free GPU memory, or the run will stop out of memory")
    encoded = "" if latents_cached else ", images encoded every step (random crops or color augmentation)"
    if model_resident:
        return f"{head}, the fastest that fits beside the loaded model{encoded} (estimated peak {peak} GiB)"
    return f"{head}, the fastest that fits{encoded} (estimated peak {peak} GiB)"


# Adapter kinds that build a full-size weight per adapted layer in every step (DoRA's normalised
# weight, LoHa's and LoKr's delta weight) and keep it for the backward pass: without gradient
# checkpointing all of them at once (SDXL at 1024 px: +7 to +12 GiB), with it one block's.
FULL_WEIGHT_KINDS = ("dora", "loha", "lokr")


def preset_values(name: str, arch: str = DEFAULT_FAMILY, memory_gb: float | None = None, *,
                  model_resident: bool = False, network: str = "lora",
                  weights_cast: tuple[str, str] | None = None, compute_dtype: str | None = None,
                  latents_cached: bool = True, form: Any = None) -> dict[str, Any]:
    """{field path: value} for preset ``name``. "auto" asks the memory estimator for the fastest
    settings that fit the free GPU memory (``memory_gb`` when given) with ``network`` adapters;
    without a GPU it is the CPU demo preset. The fixed presets turn gradient checkpointing on for
    :data:`FULL_WEIGHT_KINDS`. ``model_resident``: the host's model already sits in that memory;
    ``weights_cast``: the host casts its narrow-stored UNet weights per call; ``compute_dtype``:
    the dtype the host's model computes in (the mixed precision of every GPU preset follows it);
    ``latents_cached``: False when every step encodes its images (auto counts the VAE then);
    ``form``: the form's config, the settings no preset sets sized with it (auto)."""
    if name == "auto":
        free = memory_gb if memory_gb is not None else gpu_free_gb()
        if free is None:
            return {**_COMMON, **_CPU}
        return auto_values(arch, free, model_resident, network, weights_cast=weights_cast,
                           compute_dtype=compute_dtype, latents_cached=latents_cached, form=form)
    if name == "cpu (demo)":
        return {**_COMMON, **_CPU}
    try:
        size = int(name.split()[0])
        base = _BY_VRAM[size]
    except (ValueError, KeyError, IndexError):
        from lora_trainer.errors import ConfigError

        raise ConfigError(f"preset {name!r} is unknown; choose one of {', '.join(PRESET_NAMES)}") from None
    values = {**_COMMON, **base, **get_family(arch).preset_overrides(name)}
    if network in FULL_WEIGHT_KINDS:
        values["train.gradient_checkpointing"] = True
    if compute_dtype is not None:
        values["train.mixed_precision"] = _mixed_precision(compute_dtype)
    return values


def preset_of(cfg: Any, arch: str = DEFAULT_FAMILY, **facts: Any) -> str | None:
    """The fixed preset whose every value ``cfg`` already has (what the form shows), or None;
    ``facts``: the host's model's, as :func:`preset_values` takes them."""
    for name in PRESET_NAMES:
        if name == "auto":
            continue  # depends on the machine, not a set of values
        if all(cfg.get(path) == value for path, value in preset_values(name, arch, **facts).items()):
            return name
    return None
