"""Forge (Forge Neo, Forge Classic, lllyasviel's Forge) as a training host: the loaded
checkpoint's UNet is trained in place, as on A1111 (see docs/forge.md for why that is sound).

What Forge does differently from A1111, read in its source (Forge Neo 2.x, Forge Classic,
lllyasviel's Forge of 2025); what it shares with A1111 is in ``hosts/webui.py``:
- ``shared.sd_model.forge_objects.unet`` is a patcher around the UNet (``.model.diffusion_model``,
  LDM module names); ``forge_objects_original`` holds the patchers without LoRAs. Neo and
  lllyasviel's Forge build ``shared.sd_model`` as a ``ForgeDiffusionEngine`` (not an nn.Module,
  ``is_sd1``/``is_sdxl`` flags, Flux, Z-Image, ... engines too) and load the selected checkpoint
  on first use (``sd_models.forge_model_reload``); Classic keeps A1111's LDM objects.
- A ``<lora:...>`` makes a patcher clone with patches; they are merged into the shared weights
  when the memory manager (``backend.memory_management``; Classic: ``ldm_patched.modules.
  model_management``) loads the model, with backups that unloading restores (Neo, Classic), or
  stay merged by the model's ``lora_loader`` until it is refreshed with other patches
  (lllyasviel's Forge). The Lora extension skips re-applying when ``sd_model.current_lora_hash``
  is unchanged and lllyasviel's/Classic's cache file contents by name (``lru_cache``).
- Neo loads checkpoints, and runs text conditioning and VAE encoding, under
  ``torch.inference_mode``: the UNet's weights are turned into normal tensors (same values, one
  at a time) before training, the encoders' outputs are cloned, and the text encoders cannot be
  trained through Forge's conditioning.
- Generations run on Forge's main thread (``modules_forge.main_thread``) under the queue lock.
"""

from __future__ import annotations

import functools
import gc
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lora_trainer.errors import HostError
from lora_trainer.hosts import live_model
from lora_trainer.hosts.a1111_bundle import SizeEmbed, bundle_from_sd_model
from lora_trainer.hosts.base import DTYPE_NAMES, LoadedModel, trainable_families, trainable_labels
from lora_trainer.hosts.webui import NO_CHECKPOINT, WebUIHost, checkpoint_label
from lora_trainer.train.checkpointing import outside_checkpointed
from lora_trainer.train.recast import recast_in_backward

if TYPE_CHECKING:
    from lora_trainer.config import TrainConfig
    from lora_trainer.models.bundle import ModelBundle

log = logging.getLogger(__name__)

# Forge engines we cannot train yet, by class name (backend/diffusion_engine/*.py), in words.
ENGINE_NAMES = {
    "Flux": "Flux", "Flux2": "Flux 2", "Chroma": "Chroma", "ZImage": "Z-Image", "QwenImage": "Qwen-Image",
    "Krea2": "Krea 2", "Lumina2": "Lumina 2", "Wan": "Wan (video)", "Anima": "Anima", "ErnieImage": "Ernie-Image",
    "StableDiffusion3": "Stable Diffusion 3", "StableDiffusionXLRefiner": "the SDXL refiner", "PiD": "PiD", "Mugen": "Mugen",
}
# Forces the Lora extension to rebuild its patches at the next generation (never a real hash).
STALE_LORA_HASH = "lora-trainer: LoRA files changed"
_TRAINABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def memory_manager() -> Any:
    """Forge's memory manager module (Neo/lllyasviel: backend; Classic: ldm_patched)."""
    for name in ("backend.memory_management", "ldm_patched.modules.model_management"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise HostError("this WebUI has modules_forge but neither backend.memory_management nor "
                    "ldm_patched.modules.model_management; update Forge")


def _patchers(sd_model: Any) -> list[Any]:
    """The UNet and text-encoder patchers of the live and the LoRA-free forge objects."""
    out = []
    for objs in (sd_model.forge_objects, getattr(sd_model, "forge_objects_original", None)):
        if objs is None:
            continue
        out.append(objs.unet)
        clip = getattr(objs, "clip", None)
        if getattr(clip, "patcher", None) is not None:
            out.append(clip.patcher)
    return out


def remove_lora_patches(sd_model: Any, mm: Any) -> None:
    """Unload every model (Forge's memory manager frees VRAM and unpatch restores the weights from
    its backups), then refresh lllyasviel's ``lora_loader`` with no patches. HostError when the
    UNet's weights are still patched afterwards (only a checkpoint reload repairs that)."""
    mm.unload_all_models()
    original = getattr(sd_model, "forge_objects_original", None)
    if original is not None:
        for patcher in (original.unet, getattr(getattr(original, "clip", None), "patcher", None)):
            if hasattr(patcher, "refresh_loras"):
                patcher.refresh_loras()  # it has no patches: the loader puts its backups back
    kmodel = sd_model.forge_objects.unet.model
    leftovers = [type(p).__name__ + ".backup" for p in _patchers(sd_model) if getattr(p, "backup", None)]
    if getattr(kmodel, "current_weight_patches_uuid", None) is not None:
        leftovers.append("current_weight_patches_uuid")
    if getattr(getattr(kmodel, "lora_loader", None), "backup", None):
        leftovers.append("lora_loader.backup")
    leftovers += [f"{n} (on-the-fly LoRA)" for n, m in kmodel.diffusion_model.named_modules()
                  if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)
                  or getattr(m, "forge_online_loras", None)]
    if leftovers:
        raise HostError(f"Forge still has LoRA patches in the UNet after unloading ({leftovers[0]}); "
                        "reload the checkpoint (pick it again in the dropdown) and start again")


def check_trainable_weights(unet: nn.Module) -> None:
    """Training needs plain float weights: a quantized UNet (GGUF, NF4, FP8 storage) would need a
    dequantized second copy, which is not training the loaded model."""
    for name, p in unet.named_parameters():
        plain = type(p) in (torch.Tensor, nn.Parameter)
        if not plain or p.dtype not in _TRAINABLE_DTYPES:
            kind = str(p.dtype).replace("torch.", "") if plain else type(p).__name__
            raise HostError(f"the loaded UNet is stored as {kind} ({name}); training needs fp16, bf16 or fp32 weights: "
                            "set 'Diffusion in Low Bits' to Automatic or load an fp16 checkpoint")


def schedule_of(sd_model: Any, kmodel: Any) -> tuple[torch.Tensor, str]:
    """(alphas_cumprod, prediction type): Neo/lllyasviel keep them on ``kmodel.predictor``;
    Classic's ``model_sampling`` is a class built from EPS or V_PREDICTION and its LDM model
    object keeps the schedule (``alphas_cumprod_original`` when the WebUI overrides it)."""
    sampling = getattr(kmodel, "predictor", None)
    if sampling is None:
        sampling = getattr(kmodel, "model_sampling", None)
    pred = getattr(sampling, "prediction_type", None)
    if pred is None:
        bases = {c.__name__ for c in type(sampling).__mro__}
        pred = "v_prediction" if "V_PREDICTION" in bases else "epsilon" if "EPS" in bases else None
    if pred is None:
        pred = {"eps": "epsilon", "v": "v_prediction"}.get(getattr(sd_model, "parameterization", ""))
    ac = getattr(sampling, "alphas_cumprod", None)
    for name in ("alphas_cumprod_original", "alphas_cumprod"):
        if ac is None:
            ac = getattr(sd_model, name, None)
    if pred not in ("epsilon", "v_prediction") or ac is None:
        raise HostError("the loaded model is not a noise-prediction (eps or v) model; lora-trainer trains "
                        f"{trainable_labels()} checkpoints: load one of those to train")
    return torch.as_tensor(ac).detach().to("cpu", torch.float32).clone(), pred


def engine_size_embed(sd_model: Any) -> SizeEmbed | None:
    """SDXL's size embedding through the engine's own ``embedder`` (Neo/lllyasviel: a 256-wide
    timestep embedding per number, as ``get_learned_conditioning`` builds it); None without."""
    embedder = getattr(sd_model, "embedder", None)
    if embedder is None:
        return None
    return lambda sizes: torch.cat([embedder(sizes[:, j]) for j in range(sizes.shape[1])], dim=1)


def _residuals_out_of_place(block: nn.Module, x: torch.Tensor, context: torch.Tensor | None = None,
                            transformer_options: dict | None = None) -> torch.Tensor:
    """A transformer block's pass with its residual sums out of place: the same arithmetic as
    Forge's ``BasicTransformerBlock._forward`` without attention patches (training has none)."""
    if getattr(block, "ff_in", None):
        skip, x = x, block.ff_in(block.norm_in(x))
        x = x + skip if getattr(block, "is_res", True) else x
    x = block.attn1(block.norm1(x), context=context if block.disable_self_attn else None) + x
    if getattr(block, "attn2", None) is not None:
        x = block.attn2(block.norm2(x), context=context) + x
    h = block.ff(block.norm3(x))
    return h + x if getattr(block, "is_res", True) else h


def trainable_transformer_blocks(unet: nn.Module) -> Callable[[], None]:
    """Forge's transformer blocks add their residuals in place (``x += n``, ComfyUI's code), which
    overwrites what autograd saved for the backward pass ("modified by an inplace operation"): for
    the run each block computes the same sums out of place. Returns the undo."""
    blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    for block in blocks:
        block._forward = functools.partial(_residuals_out_of_place, block)

    def undo() -> None:
        for block in blocks:
            block.__dict__.pop("_forward", None)

    return undo


def unet_weights_cast(kmodel: Any) -> tuple[str, str] | None:
    """(storage, computation) dtype names when Forge stores the UNet narrower (or just other) than
    it computes: its loader then builds every layer with ``parameters_manual_cast`` (Neo,
    lllyasviel's: ``storage_dtype`` != ``computation_dtype``; Classic: ``manual_cast_dtype``), and
    each layer casts its weights at every call. None when they are the same (or not plain floats)."""
    storage = getattr(kmodel, "storage_dtype", None)
    if storage is None:
        storage = next(kmodel.diffusion_model.parameters()).dtype
    compute = getattr(kmodel, "computation_dtype", None) or getattr(kmodel, "manual_cast_dtype", None) or storage
    if storage == compute or storage not in DTYPE_NAMES or compute not in DTYPE_NAMES:
        return None
    return DTYPE_NAMES[storage], DTYPE_NAMES[compute]


def cast_per_call_layers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's layers that cast their stored weights per call (Neo and lllyasviel's Forge:
    ``parameters_manual_cast``; Classic: ``ldm_patched_cast_weights``)."""
    return [m for m in unet.modules()
            if getattr(m, "parameters_manual_cast", False) or getattr(m, "ldm_patched_cast_weights", False)]


@dataclass
class _Lease:
    """Everything acquire_bundle changed, so release_bundle can undo it."""

    sd_model: Any
    unet: nn.Module
    forge_objects: Any
    mm: Any
    snapshot: live_model.ModelSnapshot
    fingerprint: dict[str, tuple[float, float]]
    undo_blocks: Callable[[], None] | None = None
    undo_recast: Callable[[], None] | None = None


class ForgeHost(WebUIHost):
    """The Host protocol on Forge: what differs from ``WebUIHost`` is how the model is lent
    (patchers, the memory manager, LoRA patches) and how LoRA files are cached."""

    name = "forge"

    def __init__(self) -> None:
        super().__init__()
        self._lease: _Lease | None = None

    # -- model ------------------------------------------------------------------------------
    def weights_cast_of(self, sd_model: Any) -> tuple[str, str] | None:
        return unet_weights_cast(sd_model.forge_objects.unet.model)

    def compute_dtype_of(self, sd_model: Any) -> str | None:
        kmodel = sd_model.forge_objects.unet.model
        cast = unet_weights_cast(kmodel)
        if cast is not None:
            return cast[1]
        return DTYPE_NAMES.get(next(kmodel.diffusion_model.parameters()).dtype)

    def family_of(self, sd_model: Any) -> str | LoadedModel:
        if getattr(sd_model, "forge_objects", None) is None:  # selected, loaded on first use
            return LoadedModel(_selected_label(), _selected_family(), resident=False)
        label = checkpoint_label(sd_model)
        name = type(sd_model).__name__
        if name in ENGINE_NAMES:
            return LoadedModel.untrainable(label, ENGINE_NAMES[name])
        for family in trainable_families():
            if getattr(sd_model, family.webui_flag, False):
                return family.name
        return LoadedModel.untrainable(label, name)

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        from modules import shared

        if config.network.train_text_encoder:
            raise HostError("network.train_text_encoder: Forge runs its text encoders in inference mode, so "
                            "only the UNet can be trained there; set it to false")
        sd_model = _load_selected()
        if self.loaded_model().require_trainable() is None:
            raise HostError(NO_CHECKPOINT)
        mm = memory_manager()
        remove_lora_patches(sd_model, mm)
        unet = sd_model.forge_objects.unet.model.diffusion_model
        check_trainable_weights(unet)
        live_model.make_autograd_safe(unet)  # Neo loads checkpoints under torch.inference_mode
        alphas, prediction = schedule_of(sd_model, sd_model.forge_objects.unet.model)
        # Record first: whatever goes wrong below, release_bundle can put everything back.
        lease = _Lease(sd_model, unet, sd_model.forge_objects, mm, live_model.ModelSnapshot.capture([unet]), {})
        self._lease = lease
        try:
            # LoRA-free patchers while the run encodes: a text-encoder LoRA is not re-merged.
            sd_model.forge_objects = sd_model.forge_objects_original.shallow_copy()
            live_model.strip_peft_layers(unet)
            live_model.freeze([unet])
            lease.undo_blocks = trainable_transformer_blocks(unet)
            lease.fingerprint = live_model.fingerprint({"unet": unet})
            patcher = sd_model.forge_objects.unet
            device = torch.device(patcher.load_device)
            unet.to(device)
            bundle = bundle_from_sd_model(
                sd_model, {"unet": unet, "vae": sd_model.first_stage_model}, device, shared,
                alphas_cumprod=alphas, prediction_type=prediction, host="forge",
                compute_dtype=getattr(patcher.model, "computation_dtype", None)
                or getattr(patcher.model, "manual_cast_dtype", None),
                size_embed=engine_size_embed(sd_model))
            if unet_weights_cast(patcher.model) is not None:
                # cast per call: each layer casts its weight again in the backward pass rather than
                # autograd keeping every cast (in a checkpointed block, one block's at a time are kept)
                t = config.train
                share = t.checkpointing_share if t.gradient_checkpointing else 0.0
                lease.undo_recast = recast_in_backward(outside_checkpointed(unet, share, cast_per_call_layers(unet)))
            return bundle
        except BaseException:
            self.release_bundle(None)
            raise

    def release_bundle(self, bundle: ModelBundle | None) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        changed: list[str] = []
        try:
            live_model.strip_peft_layers(lease.unet)
            for undo in (lease.undo_blocks, lease.undo_recast):
                if undo is not None:
                    undo()
            lease.sd_model.forge_objects = lease.forge_objects
            lease.mm.unload_all_models()  # what Forge loaded for the run goes back the way Forge unloads it
            lease.snapshot.restore()
            if lease.fingerprint:
                changed = live_model.changed_tensors(lease.fingerprint, live_model.fingerprint({"unet": lease.unet}))
        finally:
            gc.collect()
            getattr(lease.mm, "soft_empty_cache", lambda: None)()
        if changed:
            self._reload_weights(f"{len(changed)} base tensors changed (first: {changed[0]})")

    def _reload_weights(self, why: str) -> None:
        from modules import sd_models

        log.error("the live model changed during training (%s); reloading the checkpoint", why)
        if hasattr(sd_models, "forge_model_reload"):
            sd_models.model_data.forge_hash = ""  # the next reload reads the file again
            sd_models.forge_model_reload()
        else:
            sd_models.reload_model_weights(forced_reload=True)

    # -- files ------------------------------------------------------------------------------
    def forget_cached_loras(self, networks: Any) -> None:
        """A file re-written under the same name is read again at the next generation: its cached
        contents are dropped and the applied-LoRA hash no longer matches any prompt."""
        from modules import shared

        cache_clear = getattr(getattr(networks, "load_lora_state_dict", None), "cache_clear", None)
        if callable(cache_clear):
            cache_clear()
        if hasattr(shared.sd_model, "current_lora_hash"):
            shared.sd_model.current_lora_hash = STALE_LORA_HASH

    # -- generation -----------------------------------------------------------------------------
    def process(self, p: Any) -> Any:
        """Forge generates on its main thread (modules_forge.main_thread), as its txt2img does."""
        from modules import processing
        from modules_forge import main_thread

        result = main_thread.run_and_wait_result(processing.process_images, p)
        if result is None:  # the main thread logged the traceback and kept the error's text
            raise HostError(f"Forge could not render: {main_thread.last_exception or 'see the console'}")
        return result


def _load_selected() -> Any:
    """The selected checkpoint, loaded now if Forge defers loading to the next generation."""
    from modules import sd_models, shared

    reload = getattr(sd_models, "forge_model_reload", None)
    if callable(reload):
        try:
            reload()
        except (ValueError, FileNotFoundError) as e:
            raise HostError(f"{NO_CHECKPOINT} ({e})") from e
    if shared.sd_model is None:
        raise HostError(NO_CHECKPOINT)
    return shared.sd_model


def _selected() -> Any:
    """The checkpoint picked in Forge's dropdown (``forge_loading_parameters``' checkpoint_info),
    not loaded yet; None before Forge has picked one."""
    from modules import sd_models

    params = getattr(getattr(sd_models, "model_data", None), "forge_loading_parameters", None) or {}
    return params.get("checkpoint_info")


def _selected_family() -> str | None:
    """The selected checkpoint's family, from its file's header (no tensor is read), so that a
    first visit before Forge has loaded it sizes "auto" for that model; None when its file does
    not tell or its family cannot be trained here (then the loaded model says why)."""
    filename = getattr(_selected(), "filename", None)
    try:
        family = _family_of_file(str(filename), Path(filename).stat().st_mtime_ns) if filename else None
    except OSError:  # moved or deleted since Forge listed it: loading it will say so
        return None
    return family if family in {f.name for f in trainable_families()} else None


@functools.lru_cache(maxsize=8)
def _family_of_file(filename: str, mtime_ns: int) -> str | None:
    """``family_of_file`` once per file version (every page load and preset asks)."""
    from lora_trainer.models.checkpoint import family_of_file

    return family_of_file(Path(filename))


def _selected_label() -> str:
    """The checkpoint picked in Forge's dropdown, not loaded yet."""
    from modules import shared

    info = _selected()
    name = getattr(info, "title", None) or getattr(info, "name", None) or (info if isinstance(info, str) else None)
    name = name or getattr(getattr(shared, "opts", None), "sd_model_checkpoint", None)
    return f"{name} (Forge loads it when the run starts)" if name else "(no checkpoint selected)"
