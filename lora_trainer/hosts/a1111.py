"""The AUTOMATIC1111 WebUI (v1.10.x) as a training host: train the loaded checkpoint in place.

What every A1111-style WebUI shares (queue lock, progress, interrogator, renders, LoRA folder)
is in ``hosts/webui.py``; this file holds only what A1111 does differently. Every ``modules``
import is inside a function, so this file imports without a WebUI.

What the WebUI gives and takes back (v1.10.1 behaviour, read from its source):
- ``shared.sd_model`` is an LDM ``LatentDiffusion`` (SD1/SD2) or an sgm ``DiffusionEngine``
  (SDXL). Its UNet, text encoder(s) and VAE are lent to the trainer as they are: no copy.
- The built-in Lora extension merges applied LoRAs into the weights and keeps CPU backups on
  each layer (``network_weights_backup``); we restore those before training so the weights are
  the checkpoint's, and empty ``networks.loaded_networks`` so nothing is re-merged mid-run.
- ``--medvram`` keeps parts on the CPU and moves them in with forward hooks; we put the UNet on
  the device for the run and put every tensor back afterwards. ``--lowvram`` is refused.
- The run holds ``call_queue.queue_lock`` (no generation meanwhile), reports through
  ``shared.state`` and stops on the WebUI's Interrupt.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_trainer.errors import HostError
from lora_trainer.hosts import live_model
from lora_trainer.hosts.a1111_bundle import arch_of, bundle_from_sd_model, trainable_modules
from lora_trainer.hosts.base import LoadedModel, trainable_families, trainable_labels
from lora_trainer.hosts.webui import WebUIHost, checkpoint_label, webui_networks

if TYPE_CHECKING:
    from lora_trainer.config import TrainConfig
    from lora_trainer.models.bundle import ModelBundle

log = logging.getLogger(__name__)


def clear_applied_networks(sd_model: nn.Module) -> int:
    """Undo LoRA deltas the WebUI merged into ``sd_model``; returns how many layers were restored.

    Each restored layer is compared with its backup before the backup is dropped, which proves
    the weights are the checkpoint's again. Raises HostError when a layer says a network is
    applied but has no backup (only a checkpoint reload can repair that).
    """
    with torch.no_grad():  # the WebUI restores inside its no_grad sampling; its weights require grad
        return _clear_applied_networks(sd_model, webui_networks())


def _clear_applied_networks(sd_model: nn.Module, networks: Any | None) -> int:
    restored = 0
    for name, module in sd_model.named_modules():
        w_backup = getattr(module, "network_weights_backup", None)
        b_backup = getattr(module, "network_bias_backup", None)
        current = getattr(module, "network_current_names", ())
        if w_backup is None and b_backup is None:
            if current:
                raise HostError(f"layer {name} has a LoRA merged in but no backup of its weights; "
                                "reload the checkpoint (Settings > Actions > Unload/Reload) and start again")
            continue
        if networks is not None and hasattr(networks, "network_restore_weights_from_backup"):
            networks.network_restore_weights_from_backup(module)
        else:
            _restore_from_backup(module, w_backup, b_backup)
        _check_equal_to_backup(name, module, w_backup)
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None
        restored += 1
    if networks is not None:
        # Empty until the next generation's load_networks: training forwards (which go through
        # the WebUI's patched Linear/Conv forward) must not merge anything back in.
        networks.loaded_networks.clear()
    return restored


def _restore_from_backup(module: nn.Module, w_backup: Any, b_backup: Any) -> None:
    # Used only when the Lora extension's module is not importable but backups exist.
    with torch.no_grad():
        if isinstance(module, nn.MultiheadAttention):
            if w_backup is not None:
                module.in_proj_weight.copy_(w_backup[0])
                module.out_proj.weight.copy_(w_backup[1])
            if b_backup is not None and module.out_proj.bias is not None:
                module.out_proj.bias.copy_(b_backup)
            return
        if w_backup is not None:
            module.weight.copy_(w_backup)
        if b_backup is not None and getattr(module, "bias", None) is not None:
            module.bias.copy_(b_backup)


def _check_equal_to_backup(name: str, module: nn.Module, w_backup: Any) -> None:
    if w_backup is None:
        return
    pairs = ([(module.in_proj_weight, w_backup[0]), (module.out_proj.weight, w_backup[1])]
             if isinstance(module, nn.MultiheadAttention) else [(module.weight, w_backup)])
    for live, backup in pairs:
        if backup is not None and not torch.equal(live.detach().cpu(), backup.to(live.dtype)):
            raise HostError(f"layer {name} still differs from the checkpoint after removing applied LoRAs; "
                            "reload the checkpoint and start again")


@dataclass
class _Lease:
    """Everything acquire_bundle changed, so release_bundle can undo it."""

    sd_model: Any
    snapshot: live_model.ModelSnapshot
    fingerprint: dict[str, tuple[float, float]]
    roots: dict[str, nn.Module]
    module_in_gpu: Any = None
    medvram: bool = False
    extras: dict[str, Any] = field(default_factory=dict)


class A1111Host(WebUIHost):
    """The Host protocol on the A1111 WebUI: what differs from ``WebUIHost`` is how the model
    is lent (LDM/sgm objects, the Lora extension's merged deltas, --medvram hooks)."""

    name = "a1111"

    def __init__(self) -> None:
        super().__init__()
        self._lease: _Lease | None = None

    # -- model ------------------------------------------------------------------------------
    def family_of(self, sd_model: Any) -> str | LoadedModel:
        if getattr(sd_model, "is_sd3", False):
            return LoadedModel.untrainable(checkpoint_label(sd_model), "Stable Diffusion 3")
        if not any(getattr(sd_model, f.webui_flag, False) for f in trainable_families()):
            return LoadedModel.untrainable(checkpoint_label(sd_model), f"not {trainable_labels('or')}")
        return arch_of(sd_model)

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        from modules import devices, lowvram, shared

        self.loaded_model().require_trainable()
        sd_model = shared.sd_model
        if getattr(shared.cmd_opts, "lowvram", False):
            raise HostError("training is not possible with --lowvram (the model is split layer by layer); "
                            "restart the WebUI with --medvram or without either flag")
        roots = trainable_modules(sd_model)
        if any(p.dtype in _FP8 for r in roots.values() for p in r.parameters()):
            raise HostError("the checkpoint is stored in FP8 (Settings > Optimizations > FP8 weight); "
                            "turn FP8 off and reload the checkpoint to train")
        device = torch.device(getattr(devices, "device", "cpu"))
        medvram = bool(getattr(sd_model, "lowvram", False)) or lowvram.is_needed(sd_model)

        # Record first: whatever goes wrong below, release_bundle can put everything back.
        snapshot = live_model.ModelSnapshot.capture([sd_model])
        lease = _Lease(sd_model, snapshot, {}, roots, getattr(lowvram, "module_in_gpu", None), medvram)
        self._lease = lease
        try:
            restored = clear_applied_networks(sd_model)
            if restored:
                log.info("restored %d layers from the WebUI's LoRA backups before training", restored)
            live_model.strip_peft_layers(sd_model)
            live_model.freeze([sd_model])
            # Fingerprinted where the tensors are now: release compares after putting them back here.
            lease.fingerprint = live_model.fingerprint(roots)
            if medvram:
                # Hooks would swap the UNet out whenever the text encoder or VAE runs; our predict
                # calls the UNet directly, so it stays on the device for the whole run.
                lowvram.send_everything_to_cpu()
                sd_model.model.to(device)
            bundle = bundle_from_sd_model(sd_model, roots, device, shared)
            if device.type == "cpu":  # its LyCORIS modules multiply the file's fp16 factors as they are
                bundle.lycoris_save_dtype = torch.float32
            return bundle
        except BaseException:
            self.release_bundle(None)
            raise

    def release_bundle(self, bundle: ModelBundle | None) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        from modules import lowvram

        sd_model = lease.sd_model
        problems = []
        try:
            live_model.strip_peft_layers(sd_model)
            if lease.medvram:
                lowvram.send_everything_to_cpu()
            lease.snapshot.restore()
            if lease.medvram:
                lowvram.module_in_gpu = lease.module_in_gpu
            if lease.fingerprint:
                changed = live_model.changed_tensors(lease.fingerprint, live_model.fingerprint(lease.roots))
                if changed:
                    problems.append(f"{len(changed)} base tensors changed (first: {changed[0]})")
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if problems:
            self._reload_weights(problems[0])

    def _reload_weights(self, why: str) -> None:
        from modules import sd_models

        log.error("the live model changed during training (%s); reloading the checkpoint's weights", why)
        sd_models.reload_model_weights(forced_reload=True)

    # -- files ------------------------------------------------------------------------------
    def forget_cached_loras(self, networks: Any) -> None:
        # load_networks compares the file's mtime with the cached network's, so a re-trained
        # file (new mtime, written atomically) is reloaded; drop stale entries now all the same.
        for name in list(getattr(networks, "networks_in_memory", {}) or {}):
            entry = networks.available_networks.get(name)
            cached = networks.networks_in_memory.get(name)
            if entry is not None and cached is not None and Path(entry.filename).stat().st_mtime > getattr(cached, "mtime", 0):
                networks.networks_in_memory.pop(name, None)


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
