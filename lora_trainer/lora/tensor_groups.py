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
