"""Metadata written into the LoRA file: kohya ``ss_*`` keys, SAI ``modelspec.*`` keys and our config.

WebUIs read these to show the base model version (A1111 hides LoRAs whose version does not
match the loaded model: ``ss_base_model_version`` starting ``sdxl_`` -> SDXL, ``ss_v2 == "True"``
-> SD2), the training tags (``ss_tag_frequency``) and the settings. Every value is a string; the
family-specific ones (base model version, architecture, implementation) come from the family.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from lora_trainer.config import NetworkConfig, TrainConfig
from lora_trainer.lora import blocks
from lora_trainer.lora.targets import convs_adapted
from lora_trainer.models.bundle import ModelBundle

NETWORK_MODULE = "networks.lora"
LYCORIS_MODULE = "lycoris.kohya"
# network.type -> LyCORIS' algo (DoRA is LyCORIS' "lora" with weight decomposition).
LYCORIS_ALGO = {"dora": "lora", "loha": "loha", "lokr": "lokr"}
SPEC_VERSION = "1.0.0"
def network_module_args(net: NetworkConfig) -> tuple[str, dict[str, str]]:
    """``ss_network_module`` and ``ss_network_args`` as kohya (LoRA, LoCon) and LyCORIS (DoRA,
    LoHa, LoKr) write them: networks.lora + conv_dim/conv_alpha; lycoris.kohya + algo, ...
    DoRA's magnitude is per input channel, LyCORIS' ``wd_on_output=False``."""
    args: dict[str, str] = {}
    module = NETWORK_MODULE if net.type in ("lora", "locon") else LYCORIS_MODULE
    if module == LYCORIS_MODULE:
        args["algo"] = LYCORIS_ALGO[net.type]
    if net.type == "lokr":
        args["factor"] = str(net.lokr_factor)
        if net.lokr_decompose_both:
            args["decompose_both"] = "True"
    if net.lycoris_preset != "kohya":
        args["preset"] = net.lycoris_preset
    # kohya records conv_dim when it was given (or LoCon's); a preset, when it adapts 3x3 convs
    if convs_adapted(net) and (net.lycoris_preset != "kohya" or net.type == "locon" or net.conv_rank is not None):
        args["conv_dim"] = str(net.conv_rank or net.rank)
        args["conv_alpha"] = _num(float(net.conv_alpha if net.conv_alpha is not None else net.alpha))
    if net.type == "dora":
        args.update(dora_wd="True", wd_on_output="False")
    args.update({f: _num(float(getattr(net, f))) for f in ("rank_dropout", "module_dropout") if getattr(net, f)})
    block_fields = (*blocks.LR_FIELDS, *blocks.DIM_FIELDS)
    args.update({f: getattr(net, f) for f in block_fields if getattr(net, f)})
    if any(getattr(net, f) for f in blocks.LR_FIELDS) and net.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = _num(float(net.block_lr_zero_threshold))
    return module, args


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value)


def _num(value: float | int | None) -> str:
    return "" if value is None else repr(float(value)) if isinstance(value, float) else str(value)


def build_metadata(config: TrainConfig, bundle: ModelBundle, *, num_images: int,
                   tag_frequency: dict[str, dict[str, int]] | None, dataset_dirs: dict[str, dict[str, int]] | None,
                   steps: int, epoch: int, started_at: float | dt.datetime | None,
                   finished_at: float | dt.datetime | None, rank: int, alpha: float,
                   output_name: str, lokr: tuple[int, bool] | None = None) -> dict[str, str]:
    """All metadata of a finished (or checkpointed) LoRA; every value a string.

    ``tag_frequency`` is {dataset dir: {tag: count}}, ``dataset_dirs`` is {dir: {"n_repeats": r,
    "img_count": n}} (kohya's shapes); timestamps are epoch seconds or datetimes. ``lokr``: LoKr's
    (factor, decompose_both) as built, where they may differ from the config's (init_from).
    """
    opt, data, net = config.optim, config.data, config.network
    if lokr is not None:
        net = dataclasses.replace(net, lokr_factor=lokr[0], lokr_decompose_both=lokr[1])
    family, pred = bundle.family, bundle.prediction_type
    started, finished = _timestamp(started_at), _timestamp(finished_at)
    when = dt.datetime.fromtimestamp(int(finished or started or dt.datetime.now().timestamp()), dt.timezone.utc)
    resolution = f"{data.resolution}x{data.resolution}"
    unet_lr = opt.unet_lr if opt.unet_lr is not None else opt.learning_rate
    te_lr = opt.text_encoder_lr if opt.text_encoder_lr is not None else opt.learning_rate
    module, args = network_module_args(net)
    md: dict[str, str] = {
        "ss_output_name": output_name,
        "ss_base_model_version": family.base_model_version(pred),
        "ss_v2": str(family.kohya_v2),
        "ss_v_parameterization": str(pred == "v_prediction"),
        "ss_network_module": module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _num(float(alpha)),
        "ss_network_dropout": _num(float(net.dropout)),
        "ss_sd_model_name": bundle.name,
        "ss_resolution": f"({data.resolution}, {data.resolution})",
        "ss_num_train_images": str(int(num_images)),
        "ss_tag_frequency": json.dumps(tag_frequency or {}, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dataset_dirs or {}, ensure_ascii=False),
        "ss_learning_rate": _num(float(opt.learning_rate)),
        "ss_unet_lr": _num(float(unet_lr)) if net.train_unet else "",
        "ss_text_encoder_lr": _num(float(te_lr)) if net.train_text_encoder else "",
        "ss_steps": str(int(steps)),
        "ss_max_train_steps": str(config.train.max_train_steps or int(steps)),
        "ss_epoch": str(int(epoch)),
        "ss_num_epochs": str(config.train.epochs),
        "ss_batch_size_per_device": str(config.train.batch_size),
        "ss_gradient_accumulation_steps": str(config.train.gradient_accumulation_steps),
        "ss_seed": str(config.train.seed),
        "ss_optimizer": (f"{opt.optimizer}({','.join(opt.optimizer_args.split())})" if opt.optimizer_args
                         else opt.optimizer),
        "ss_lr_scheduler": opt.lr_scheduler,
        "ss_mixed_precision": config.train.mixed_precision,
        **_noise_and_loss(config),
        "ss_enable_bucket": str(data.enable_buckets),
        "ss_flip_aug": str(data.flip),
        "ss_color_aug": str(data.color_aug),
        "ss_masked_loss": str(data.alpha_mask or bool(data.mask_dir)),
        "ss_keep_tokens": str(data.keep_tokens),
        "ss_shuffle_caption": str(data.shuffle_captions),
        "ss_caption_dropout_rate": _num(float(data.caption_dropout)),
        "ss_caption_tag_dropout_rate": _num(float(data.tag_dropout)),
        "ss_training_started_at": _num(started),
        "ss_training_finished_at": _num(finished),
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": family.modelspec_architecture(pred),
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": output_name,
        "modelspec.resolution": resolution,
        "modelspec.prediction_type": "v" if pred == "v_prediction" else "epsilon",
        "modelspec.date": when.strftime("%Y-%m-%dT%H:%M:%S"),
        "lora_trainer_config": json.dumps(config.to_dict(), ensure_ascii=False, default=str),
    }
    md.update(bundle.family.lora_metadata(bundle))  # per family and variant (Flux.1-dev, SD3.5 large, ...)
    if args:
        md["ss_network_args"] = json.dumps(args)
    return {**md, **_set_only(config, bundle)}


def _noise_and_loss(config: TrainConfig) -> dict[str, str]:
    """kohya's keys of the noise, timesteps and loss a run trained with."""
    t = config.train
    return {
        "ss_noise_offset": _num(float(t.noise_offset)),
        "ss_noise_offset_random_strength": str(t.noise_offset_random_strength),
        "ss_adaptive_noise_scale": _num(float(t.adaptive_noise_scale) or None),
        "ss_ip_noise_gamma": _num(float(t.ip_noise_gamma) or None),
        "ss_ip_noise_gamma_random_strength": str(t.ip_noise_gamma_random_strength),
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_c": _num(float(t.huber_c)),
        "ss_huber_scale": _num(float(t.huber_scale)),
        "ss_multires_noise_iterations": str(t.multires_noise_iterations),
        "ss_multires_noise_discount": _num(float(t.multires_noise_discount)),
        "ss_min_snr_gamma": _num(t.min_snr_gamma),
        "ss_debiased_estimation": str(t.debiased_estimation_loss),
        "ss_zero_terminal_snr": str(t.zero_terminal_snr),
        "ss_min_timestep": str(t.min_timestep),
        "ss_max_timestep": str(t.max_timestep if t.max_timestep is not None else 1000),
    }


def _set_only(config: TrainConfig, bundle: ModelBundle) -> dict[str, str]:
    """The metadata written only when its setting is set (kohya's keys where kohya has them)."""
    net, opt = config.network, config.optim
    values = {"modelspec.trigger_phrase": config.data.trigger_word,
              "ss_training_comment": config.output.training_comment,
              "ss_scale_weight_norms": _num(net.scale_weight_norms),
              "ss_loraplus_lr_ratio": _num(opt.loraplus_lr_ratio),
              "ss_caption_dropout_every_n_epochs": _num(config.data.caption_dropout_every_n_epochs or None),
              "ss_sd_model_hash": bundle.legacy_hash, "ss_new_sd_model_hash": bundle.model_hash}
    return {k: v for k, v in values.items() if v}
