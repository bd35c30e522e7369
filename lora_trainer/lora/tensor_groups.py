"""Any LoRA/LyCORIS file's tensors grouped by module, for ``inspect``: the module kinds by their
tensor names, and the metadata keys the summary shows. Knows no family (each family's own report
uses it too).
"""

from __future__ import annotations

from collections import defaultdict

import torch

SUMMARY_KEYS = ("ss_output_name", "ss_base_model_version", "ss_v2", "ss_network_module", "ss_network_dim",
                 "ss_network_alpha", "ss_network_args", "ss_sd_model_name", "ss_resolution", "ss_num_train_images", "ss_steps",
                 "ss_epoch", "ss_learning_rate", "ss_optimizer", "ss_training_finished_at",
                 "modelspec.architecture", "modelspec.trigger_phrase", "modelspec.date")


# The training options a LoRA's metadata records (kohya's keys): the report names those that
# were on, so an inspected file says how it was trained.
RECIPE_KEYS = ("ss_mixed_precision", "ss_noise_offset", "ss_noise_offset_random_strength", "ss_adaptive_noise_scale",
               "ss_multires_noise_iterations", "ss_ip_noise_gamma", "ss_ip_noise_gamma_random_strength",
               "ss_zero_terminal_snr", "ss_min_snr_gamma", "ss_debiased_estimation", "ss_loss_type",
               "ss_huber_schedule", "ss_huber_c", "ss_masked_loss", "ss_min_timestep", "ss_max_timestep",
               "ss_loraplus_lr_ratio", "ss_scale_weight_norms", "ss_flip_aug", "ss_color_aug",
               "ss_shuffle_caption",
               "ss_caption_dropout_rate", "ss_caption_tag_dropout_rate")
_OFF = ("", "None", "none", "False", "0", "0.0", "no")


def recipe(md: dict[str, str]) -> dict[str, str]:
    """{option: value} of the training options that were on (a flag as "True"); the loss type
    when not l2 with its Huber settings, and the timestep range when not all of 0-1000."""
    huber = md.get("ss_loss_type") in ("huber", "smooth_l1")
    out = {}
    for key in RECIPE_KEYS:
        value = md.get(key, "")
        if value in _OFF or (key == "ss_loss_type" and value == "l2") or (key == "ss_max_timestep" and value == "1000"):
            continue
        if key in ("ss_huber_schedule", "ss_huber_c") and not huber:
            continue
        out[key.removeprefix("ss_")] = value
    return out

# Module kinds by the names of their tensors (LyCORIS' names; kohya's LoRA; A1111's network_*.py).
KIND_MARKS = {"lora": ("lora_up.weight", "lora_down.weight", "lora_mid.weight"),
              "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
              "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
              "oft": ("oft_blocks", "oft_diag", "rescale"), "ia3": ("on_input",),
              "glora": ("a1.weight", "a2.weight", "b1.weight", "b2.weight"), "full": ("diff", "diff_b")}


SUFFIXES = sorted({s for marks in KIND_MARKS.values() for s in marks} | {"alpha", "dora_scale", "weight"},
                   key=len, reverse=True)


def kind_of(names: set[str]) -> str:
    if "weight" in names and "on_input" in names:
        return "ia3"
    for kind, marks in KIND_MARKS.items():
        if kind != "ia3" and names & set(marks):
            return kind
    return "unknown"


def split_tensors(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    bad_keys: list[str] = []
    for key, t in tensors.items():
        suffix = next((s for s in SUFFIXES if key.endswith("." + s)), None)
        if suffix is None:
            bad_keys.append(key)
            continue
        modules[key[: -len(suffix) - 1]][suffix] = t
    return modules, bad_keys
