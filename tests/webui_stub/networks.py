"""Stand-in for the built-in Lora extension's ``networks`` module (A1111 v1.10.1).

Keeps the behaviour lora-trainer depends on, written for the tests:
- ``list_available_networks()`` rescans ``shared.cmd_opts.lora_dir`` into ``available_networks``.
- ``load_networks(names, ...)`` loads files (again when a file's mtime is newer than the cached
  network's), resolving each file key to a model layer by the WebUI's rule: dots of the model's
  module names become underscores (``network_layer_mapping``); SD1 keys in diffusers naming are
  converted to LDM names; otherwise ``lora_unet_`` -> ``diffusion_model_``. Unmatched keys are
  only recorded (``keys_failed_to_match``), never raised, as in the WebUI.
- ``network_apply_weights(layer)`` merges the loaded networks into the layer's weight in place,
  keeping a CPU backup in ``network_weights_backup``; ``network_restore_weights_from_backup``
  puts the backup back.
"""

from __future__ import annotations

import os
import re

import torch
from modules import shared
from safetensors.torch import load_file


class NetworkOnDisk:
    def __init__(self, name: str, filename: str) -> None:
        self.name, self.filename, self.alias = name, filename, name


class Network:
    def __init__(self, name: str, on_disk: NetworkOnDisk) -> None:
        self.name, self.on_disk = name, on_disk
        self.mtime = os.path.getmtime(on_disk.filename)
        self.modules: dict[str, dict[str, torch.Tensor]] = {}
        self.te_multiplier = self.unet_multiplier = 1.0


available_networks: dict[str, NetworkOnDisk] = {}
available_network_aliases: dict[str, NetworkOnDisk] = {}
loaded_networks: list[Network] = []
networks_in_memory: dict[str, Network] = {}
keys_failed_to_match: dict[str, str] = {}
load_count = 0  # test aid: how often a file was read
scan_count = 0  # test aid: how often the folder was rescanned


def list_available_networks() -> None:
    global scan_count
    scan_count += 1
    available_networks.clear()
    available_network_aliases.clear()
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _, files in os.walk(shared.cmd_opts.lora_dir):
        for f in sorted(files):
            if os.path.splitext(f)[1] in (".safetensors", ".pt", ".ckpt"):
                name = os.path.splitext(f)[0]
                entry = NetworkOnDisk(name, os.path.join(root, f))
                available_networks[name] = entry
                available_network_aliases[name] = entry


def assign_network_names_to_compvis_modules(sd_model) -> None:
    mapping = {}
    wrapped = getattr(sd_model.cond_stage_model, "wrapped", sd_model.cond_stage_model)
    for name, module in wrapped.named_modules():
        mapping[name.replace(".", "_")] = module
        module.network_layer_name = name.replace(".", "_")
    for name, module in sd_model.model.named_modules():
        mapping[name.replace(".", "_")] = module
        module.network_layer_name = name.replace(".", "_")
    sd_model.network_layer_mapping = mapping


_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def _res_suffix(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest
    return next((v + rest[len(k):] for k, v in _RESNET.items() if rest.startswith(k)), rest)


def webui_layer_name(key: str) -> str:
    """SD1 file key (without tensor suffix) -> the layer name the WebUI looks up."""
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_input_blocks_{1 + 3 * i + j}_{1 if kind == 'attentions' else 0}_{_res_suffix(kind, rest)}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        idx = 1 if m[1] == "attentions" else int(m[2]) * 2
        return f"diffusion_model_middle_block_{idx}_{_res_suffix(m[1], m[3])}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"diffusion_model_output_blocks_{3 * i + j}_{1 if kind == 'attentions' else 0}_{_res_suffix(kind, rest)}"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def resolve(sd_model, key: str):
    """The live layer a file key names, or None (the WebUI's matching, SD1 subset)."""
    mapping = sd_model.network_layer_mapping
    layer = mapping.get(webui_layer_name(key))
    if layer is None and "lora_unet" in key:
        layer = mapping.get(key.replace("lora_unet", "diffusion_model"))
    return layer


def load_network(name: str, on_disk: NetworkOnDisk) -> Network:
    global load_count
    load_count += 1
    net = Network(name, on_disk)
    for full_key, tensor in load_file(on_disk.filename).items():
        key, _, part = full_key.partition(".")
        net.modules.setdefault(key, {})[part] = tensor
    for key in net.modules:
        layer = resolve(shared.sd_model, key)
        if layer is None:
            keys_failed_to_match[key] = key
        else:
            net.modules[key]["layer_name"] = layer.network_layer_name
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None) -> None:
    loaded_networks.clear()
    if any(n not in available_networks for n in names):
        list_available_networks()
    for i, name in enumerate(names):
        on_disk = available_networks.get(name)
        if on_disk is None:
            continue
        net = networks_in_memory.get(name)
        if net is None or os.path.getmtime(on_disk.filename) > net.mtime:
            net = load_network(name, on_disk)
            networks_in_memory[name] = net
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        loaded_networks.append(net)


def network_restore_weights_from_backup(layer) -> None:
    # As the WebUI's: a plain copy_, with no torch.no_grad() of its own (the WebUI calls it from
    # forwards that run under no_grad), so on weights that require grad it raises unless the
    # caller disables grad.
    w = getattr(layer, "network_weights_backup", None)
    b = getattr(layer, "network_bias_backup", None)
    if w is None and b is None:
        return
    if w is not None:
        layer.weight.copy_(w)
    if b is not None:
        layer.bias.copy_(b)


def network_apply_weights(layer) -> None:
    name = getattr(layer, "network_layer_name", None)
    if name is None:
        return
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier) for n in loaded_networks)
    current = getattr(layer, "network_current_names", ())
    if current == wanted:
        return
    if getattr(layer, "network_weights_backup", None) is None and wanted:
        layer.network_weights_backup = layer.weight.detach().to("cpu", copy=True)
        bias = getattr(layer, "bias", None)
        layer.network_bias_backup = None if bias is None else bias.detach().to("cpu", copy=True)
    network_restore_weights_from_backup(layer)
    with torch.no_grad():
        for net in loaded_networks:
            for mod in net.modules.values():
                if mod.get("layer_name") != name:
                    continue
                down, up = mod["lora_down.weight"].float(), mod["lora_up.weight"].float()
                scale = float(mod["alpha"]) / down.shape[0] if "alpha" in mod else 1.0
                mult = net.unet_multiplier if name.startswith("diffusion_model") else net.te_multiplier
                delta = up.flatten(1) @ down.flatten(1)
                layer.weight += (delta.reshape(layer.weight.shape) * scale * mult).to(layer.weight.dtype)
    layer.network_current_names = wanted


def apply_to_model(sd_model) -> None:
    """What the WebUI's patched Linear/Conv forwards do before each call, for every layer at once."""
    for layer in sd_model.network_layer_mapping.values():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            network_apply_weights(layer)
