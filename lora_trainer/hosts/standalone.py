"""StandaloneHost: the Host used by the CLI and the standalone app (no WebUI).

It loads base models with ``load_bundle`` and keeps the last one loaded, so the app can train
several LoRAs in a row without reloading. Test renders run a diffusers pipeline built from the
bundle's own modules, with the LoRA file read by diffusers' ``load_lora_weights`` — the same
reader other diffusers-based tools use, so a render also checks the file is readable there.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_trainer.errors import HostError, LoraFormatError
from lora_trainer.locks import Waiting, hold

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.config import ModelConfig, TrainConfig
    from lora_trainer.models.bundle import ModelBundle
    from lora_trainer.train.events import TrainEvent

log = logging.getLogger(__name__)

# <lora:name:w>, <lyco:name:w> and <hypernet:name:w> are WebUI prompt syntax, not text to encode.
_NETWORK_TAG = re.compile(r"<(?:lora|lyco|hypernet):[^>]*>", re.IGNORECASE)
RENDER_ADAPTER = "lt_render"


def strip_network_tags(prompt: str) -> str:
    """The prompt without WebUI ``<lora:...>`` tags (and the spaces/commas they leave behind)."""
    if not _NETWORK_TAG.search(prompt):
        return prompt
    pieces = (" ".join(p.split()) for p in _NETWORK_TAG.sub("", prompt).split(","))
    return ", ".join(p for p in pieces if p)


def _cache_key(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> tuple:
    # the separate parts of a single-file Flux.1/SD3.5 and fp8/nf4 storage make another model too
    parts = tuple(getattr(model_cfg, f, None) for f in ("clip_l", "clip_g", "t5xxl", "t5_tokenizer", "weight_dtype"))
    return (model_cfg.base_model, model_cfg.vae, model_cfg.arch, model_cfg.prediction_type, str(device), dtype, *parts)


def _has_adapter_layers(bundle: ModelBundle) -> bool:
    """True when LoRA layers were left in the model (a run that failed to clean up)."""
    return any("lora_" in name for root in bundle.trainable_roots().values() for name, _ in root.named_modules())


class StandaloneHost:
    """Host for the CLI and the standalone app: models from files, LoRAs into the output folder."""

    name = "standalone"
    has_txt2img = False

    def __init__(self, keep_cache: bool = True, lora_dir: str | Path | None = None) -> None:
        self.keep_cache = keep_cache
        self._lock = threading.Lock()
        self._cache: dict[tuple, ModelBundle] = {}
        self._lora_dir = Path(lora_dir) if lora_dir is not None else None
        self._last_bundle: ModelBundle | None = None

    # --- model ------------------------------------------------------------------------------
    def loaded_model(self) -> None:
        """None: each run loads the model its config names (``model.base_model``)."""
        return None

    @property
    def captioner(self) -> None:
        """None: the caption tools load their own BLIP/CLIP."""
        return None

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        from lora_trainer.models.loaders import resolve_device, resolve_dtype, resolve_mixed_precision

        self._lora_dir = self.lora_dir(config)
        device = resolve_device(config.model.device)
        precision = resolve_mixed_precision(getattr(config.train, "mixed_precision", "no"), device)
        dtype = resolve_dtype(config.model.weight_dtype, device, precision)
        key = _cache_key(config.model, device, dtype)
        bundle = self._cache.get(key)
        if bundle is None:
            from lora_trainer.models import placement
            from lora_trainer.models.loaders import load_bundle

            self._cache.clear()  # one model at a time: free the previous one before loading
            with placement.denoiser_placed_later():  # the trainer places it once the caches are filled
                bundle = load_bundle(config.model, device, dtype)
            if self.keep_cache:
                self._cache[key] = bundle
        self._last_bundle = bundle
        return bundle

    def release_bundle(self, bundle: ModelBundle) -> None:
        """Nothing to restore for a model this host loaded; drop it if it was left modified."""
        if _has_adapter_layers(bundle):
            log.warning("LoRA layers were left in %s after training; it will be reloaded next time", bundle.name)
            self.free()
        elif not self.keep_cache:
            self.free()

    def free(self) -> None:
        """Forget the cached model (its memory is released once nothing else holds it)."""
        self._cache.clear()
        self._last_bundle = None

    # --- surroundings -----------------------------------------------------------------------
    def lora_dir(self, config: TrainConfig) -> Path:
        return Path(config.output.output_dir).expanduser()

    def lock(self, waiting: Waiting | None = None) -> contextlib.AbstractContextManager[None]:
        return hold(self._lock, waiting)

    def on_event(self, event: TrainEvent) -> None:
        log.debug("train event: %s", event)

    def interrupted(self) -> bool:
        return False

    def refresh_loras(self) -> None:
        """Files are read from disk on every render: nothing to refresh."""

    def lora_path_for(self, name: str) -> Path:
        """``<lora_dir>/<name>.safetensors`` (the folder of the last run, or the one given at init)."""
        from lora_trainer.lora.files import sanitize_name

        if self._lora_dir is None:
            raise HostError("no LoRA folder known yet; train first or create StandaloneHost(lora_dir=...)")
        return self._lora_dir / f"{sanitize_name(name)}.safetensors"

    # --- test render ------------------------------------------------------------------------
    def render(self, prompt: str, negative_prompt: str, seed: int, lora_name: str, weights: list[float],
               steps: int, width: int, height: int, guidance_scale: float | None = None) -> list[Image.Image]:
        """One image per LoRA weight, all from the same seed (weight 0 is the base model); the
        guidance is the family's (a CFG scale of 7, Flux.1-dev's distilled 3.5) unless given."""
        bundle = self._last_bundle
        if bundle is None:
            raise HostError("no model is loaded; train or load a model before rendering")
        if _has_adapter_layers(bundle):
            raise HostError("the model has LoRA layers in it (a run is training it); render after the run ends")
        path = self.lora_path_for(lora_name)
        if not path.is_file():
            raise HostError(f"LoRA file {path} not found; check the name or the output folder")
        from lora_trainer.models import placement

        guidance = bundle.family.sample_guidance if guidance_scale is None else float(guidance_scale)
        render = self._render if "parts" in bundle.extras else _render_injected
        with placement.denoiser_placed(bundle):  # left in the host's memory between runs
            return render(bundle, path, strip_network_tags(prompt), negative_prompt, seed, weights,
                          (steps, width, height, guidance))

    def _render(self, bundle: ModelBundle, path: Path, text: str, negative_prompt: str, seed: int,
                weights: list[float], sampling: tuple[int, int, int, float]) -> list[Image.Image]:
        pipe = build_render_pipeline(bundle)
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        # diffusers warns about a UNet-only LoRA ("no LoRA keys ... CLIPTextModel"): not news to a user
        diffusers_logging.set_verbosity_error()
        try:
            pipe.load_lora_weights(str(path), adapter_name=RENDER_ADAPTER)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise LoraFormatError(f"{path}: diffusers cannot apply this LoRA to {bundle.name} ({exc})") from None
        finally:
            diffusers_logging.set_verbosity(level)
        try:
            return [_render_one(pipe, bundle, text, negative_prompt, seed, w, *sampling) for w in weights]
        finally:
            pipe.unload_lora_weights()


def _render_injected(bundle: ModelBundle, path: Path, text: str, negative_prompt: str, seed: int,
                     weights: list[float], sampling: tuple[int, int, int, float]) -> list[Image.Image]:
    """The families without a diffusers pipeline here (Flux.1, SD3.5): the file's LoRA put on the
    model as training puts it, and the sampler of training's sample images, once per weight."""
    from lora_trainer.config import SampleConfig
    from lora_trainer.lora.inject import inject_file
    from lora_trainer.torch_compat import autocast_supported
    from lora_trainer.train.sampler import render_sample

    steps, width, height, guidance = sampling
    cfg = SampleConfig(prompt=text, negative_prompt=negative_prompt, seed=int(seed), steps=int(steps),
                       guidance_scale=guidance)
    device, dtype = bundle.device, bundle.dtype
    low = dtype in (torch.float16, torch.bfloat16) and device.type != "cpu" and autocast_supported(device.type, dtype)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if low else None
    net = inject_file(bundle, str(path))
    try:
        images = []
        for w in weights:
            net.set_scale(w)
            images.append(render_sample(bundle, cfg, int(width), int(height), autocast=autocast))
        return images
    finally:
        net.remove()


def build_render_pipeline(bundle: ModelBundle) -> Any:
    """A diffusers txt2img pipeline sharing the bundle's modules (no copy of the weights)."""
    import diffusers

    parts = bundle.extras.get("parts")
    if parts is None:
        raise HostError(f"{bundle.name} was not loaded from diffusers parts; it cannot be rendered standalone")
    # DPM-Solver++ gives usable images in ~20 steps; it takes the model's schedule and prediction type.
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        parts["scheduler"].config, prediction_type=bundle.prediction_type)
    try:
        cls = getattr(diffusers, bundle.extras["pipeline_class"])
    except (ImportError, RuntimeError) as e:  # diffusers imports pipelines lazily, on first use
        raise HostError(f"the Test section renders with diffusers' {bundle.extras['pipeline_class']}, which does "
                        f"not import with the installed packages ({str(e).splitlines()[-1][:160]}); upgrade "
                        "transformers to a version your diffusers supports") from None
    family = bundle.family
    encoders = {k: parts[k] for _, te, tok in family.text_encoder_folders for k in (te, tok)}
    pipe = cls(vae=parts["vae"], unet=parts["unet"], scheduler=scheduler, **encoders,
               **family.render_pipeline_kwargs())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _read_as_prompt(bundle: ModelBundle, text: str | None, name: str) -> dict[str, Any]:
    """The pipeline's arguments for ``text`` (``name``: "prompt" or "negative_prompt") read as the
    WebUI reads a prompt: a text with emphasis or escapes (``(word:1.2)``, ``\\(``) as the
    bundle's weighted embeddings, as training's samples take it; any other as the text itself."""
    from lora_trainer.data.emphasis import parse_emphasis

    if not text or bundle.encode_weighted is None or parse_emphasis(text) == [(text, 1.0)]:
        return {name: text}
    cond = bundle.encode_weighted([text])
    embeds = {f"{name}_embeds": cond["context"]}
    if "pooled" in cond:  # SDXL: "pooled_prompt_embeds", "negative_pooled_prompt_embeds"
        embeds[name.replace("prompt", "pooled_prompt") + "_embeds"] = cond["pooled"]
    return embeds


def _render_one(pipe: Any, bundle: ModelBundle, prompt: str, negative_prompt: str, seed: int, weight: float,
                steps: int, width: int, height: int, guidance_scale: float) -> Image.Image:
    from PIL import Image

    pipe.set_adapters([RENDER_ADAPTER], adapter_weights=[float(weight)])
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        texts = {**_read_as_prompt(bundle, prompt, "prompt"), **_read_as_prompt(bundle, negative_prompt or None,
                                                                                   "negative_prompt")}
        latents = pipe(**texts, num_inference_steps=steps, width=width, height=height,
                       guidance_scale=guidance_scale, generator=generator, output_type="latent").images
        # Decode with the bundle's codec: it keeps the SDXL VAE in fp32, which the pipeline would not.
        pixels = bundle.decode_latents(latents)
    array = ((pixels[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    return Image.fromarray(array)
