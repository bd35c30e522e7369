"""Stand-in for Forge's built-in Lora extension (``extensions-builtin/sd_forge_lora/networks.py``).

- ``list_available_networks()`` rescans ``shared.cmd_opts.lora_dir``.
- ``load_networks(names, te_multipliers, unet_multipliers)`` returns early when the list of
  (file, weights) equals ``sd_model.current_lora_hash``; otherwise it restarts from
  ``forge_objects_original`` and adds each file's deltas as patches on clones of the UNet and
  CLIP patchers (``load_lora_for_models``), then stores ``forge_objects_after_applying_lora``.
- ``load_lora_state_dict(filename)`` is cached by file name (``functools.lru_cache(maxsize=5)``,
  as in lllyasviel's Forge and Forge Classic): a file re-written under the same name is served
  from the cache until ``load_lora_state_dict.cache_clear()``.
- File keys are matched to model keys as Forge's ``model_lora_keys_unet/clip`` do (dots of the
  state-dict key become underscores; SD1 diffusers names go through ``lora_keys``); a LoRA with
  more than half of its keys unmatched is dropped whole (Neo's rule), and counted.
"""

from __future__ import annotations

import functools
import os

from lora_keys import webui_layer_name
from modules import sd_models, shared
from safetensors.torch import load_file


class NetworkOnDisk:
    def __init__(self, name: str, filename: str) -> None:
        self.name, self.filename, self.alias = name, filename, name


available_networks: dict[str, NetworkOnDisk] = {}
loaded_networks: list[str] = []
reads: list[str] = []  # test aid: files read from disk
dropped: list[str] = []  # test aid: LoRAs dropped for unmatched keys
last_unmatched: dict[str, list[str]] = {}  # test aid: file -> unmatched keys


@functools.lru_cache(maxsize=5)
def load_lora_state_dict(filename: str) -> dict:
    reads.append(filename)
    return load_file(filename)


def list_available_networks() -> None:
    available_networks.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for f in sorted(files):
            if f.endswith(".safetensors"):
                name = os.path.splitext(f)[0]
                available_networks[name] = NetworkOnDisk(name, os.path.join(root, f))


def _key_map(module, prefix: str, lora_prefix: str) -> dict[str, str]:
    return {lora_prefix + k[len(prefix):-len(".weight")].replace(".", "_"): k
            for k in module.state_dict() if k.startswith(prefix) and k.endswith(".weight")}


def model_lora_keys_unet(kmodel) -> dict[str, str]:
    return _key_map(kmodel, "diffusion_model.", "lora_unet_")


def model_lora_keys_clip(cond_stage_model) -> dict[str, str]:
    return _key_map(cond_stage_model, "clip_l.transformer.", "lora_te_")


def file_modules(lora: dict) -> dict[str, dict]:
    modules: dict[str, dict] = {}
    for full, tensor in lora.items():
        name, _, part = full.partition(".")
        modules.setdefault(name, {})[part] = tensor
    return modules


def load_lora(modules: dict[str, dict], key_map: dict[str, str]) -> tuple[dict, dict]:
    """{model key: (down, up, alpha)} for the modules found in ``key_map``, and the rest. SD1 UNet
    names in diffusers form resolve through the LDM name, as Forge's unet_to_diffusers map does."""
    patches, unmatched = {}, {}
    for name, parts in modules.items():
        target = key_map.get(name)
        if target is None and name.startswith("lora_unet_"):
            target = key_map.get(webui_layer_name(name).replace("diffusion_model_", "lora_unet_", 1))
        if target is None:
            unmatched[name] = parts
        else:
            patches[target] = (parts["lora_down.weight"], parts["lora_up.weight"], parts.get("alpha"))
    return patches, unmatched


def load_lora_for_models(model, clip, lora: dict, strength_model: float, strength_clip: float, filename: str):
    modules = file_modules(lora)
    unet_patches, rest = load_lora(modules, model_lora_keys_unet(model.model))
    clip_patches, rest = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model))
    last_unmatched[filename] = sorted(rest)
    if len(rest) / max(len(modules), 1) > 0.5:
        dropped.append(filename)
        return model, clip
    if unet_patches:
        model = model.clone()
        model.add_patches(filename=filename, patches=unet_patches, strength_patch=strength_model)
    if clip_patches:
        clip = clip.clone()
        clip.add_patches(filename=filename, patches=clip_patches, strength_patch=strength_clip)
    return model, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    current_sd = sd_models.model_data.sd_model
    loaded_networks[:] = list(names)
    if any(n not in available_networks for n in names):
        list_available_networks()
    on_disk = [available_networks.get(n) for n in names]
    targets = [[d.filename, u, t, False] for d, u, t in zip(on_disk, unet_multipliers or [], te_multipliers or [], strict=False)
               if d is not None]
    if current_sd.current_lora_hash == str(targets):
        return
    current_sd.current_lora_hash = str(targets)
    current_sd.forge_objects.unet = current_sd.forge_objects_original.unet
    current_sd.forge_objects.clip = current_sd.forge_objects_original.clip
    for filename, strength_model, strength_clip, _ in targets:
        lora_sd = load_lora_state_dict(filename)
        current_sd.forge_objects.unet, current_sd.forge_objects.clip = load_lora_for_models(
            current_sd.forge_objects.unet, current_sd.forge_objects.clip, lora_sd, strength_model, strength_clip,
            filename)
    current_sd.forge_objects_after_applying_lora = current_sd.forge_objects.shallow_copy()
