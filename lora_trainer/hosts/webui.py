"""What every A1111-style WebUI host shares (A1111, Forge Classic, Forge Neo).

These WebUIs keep A1111's surface for what a training host needs: ``modules.call_queue.
queue_lock`` around GPU work, ``modules.shared.state`` for the progress bar and the Interrupt
button, ``shared.interrogator`` (BLIP), ``processing.StableDiffusionProcessingTxt2Img`` for
renders, ``--lora-dir`` and a built-in Lora extension whose ``networks`` module lists the
files. :class:`WebUIHost` implements the Host protocol on that surface; a subclass adds only how
its WebUI holds the model (family, lending it for training, restoring it) and how its LoRA
loader caches files. Every ``modules`` import is inside a function: this file imports without a
WebUI.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_trainer.errors import HostError, LoraTrainerError, ModelLoadError, one_line
from lora_trainer.hosts.base import DTYPE_NAMES, LoadedModel
from lora_trainer.locks import Waiting, hold

if TYPE_CHECKING:
    from PIL import Image

    from lora_trainer.config import TrainConfig
    from lora_trainer.jobs import ApiJobs
    from lora_trainer.train.events import TrainEvent

log = logging.getLogger(__name__)

NO_CHECKPOINT = "no checkpoint is loaded in the WebUI; pick one in the checkpoint dropdown first"


def webui_networks() -> Any | None:
    """The built-in Lora extension's ``networks`` module, if the WebUI loaded it."""
    mod = sys.modules.get("networks")
    if mod is not None and hasattr(mod, "loaded_networks"):
        return mod
    try:
        mod = importlib.import_module("networks")
    except Exception:  # noqa: BLE001 - Lora extension disabled or absent
        return None
    return mod if hasattr(mod, "loaded_networks") else None


def is_forge() -> bool:
    """Forge (Neo, Classic, lllyasviel's) ships ``modules_forge`` next to A1111's ``modules``."""
    import importlib.util

    return importlib.util.find_spec("modules_forge") is not None


def make_temp_dir() -> None:
    """Make the WebUI's folder for temporary images (Settings: "Directory for temporary images")
    if it is missing. Gradio saves each new image a gallery shows there; Forge Neo's default,
    ``<webui>/tmp``, is made only when that setting is changed, so on a fresh install every image
    the tab showed (samples, the Test section's sweep) failed with "No such file or directory"."""
    from modules import shared

    folder = str(getattr(getattr(shared, "opts", None), "temp_dir", "") or "")
    if not folder:  # the system's temp folder, which gradio makes itself
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("cannot create the WebUI's folder for temporary images %s (%s); set another one in "
                    "Settings, or the tab's images will not show", folder, e)


def checkpoint_label(sd_model: Any) -> str:
    """The loaded checkpoint's title as the WebUI's dropdown shows it."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "title", None) or getattr(info, "name", None) or getattr(info, "model_name", None)
    return f"{name} (loaded in the WebUI)" if name else "(checkpoint loaded in the WebUI)"


class WebUIHost:
    """The Host protocol on an A1111-style WebUI; subclasses say how they hold the model."""

    name = "webui"
    has_txt2img = True

    def __init__(self) -> None:
        self._lock_owner: int | None = None
        self._started = 0.0

    # -- model (per WebUI) --------------------------------------------------------------------
    def family_of(self, sd_model: Any) -> str | LoadedModel:
        """The family of a trainable ``sd_model`` ("sd1", "sd2", "sdxl"), else ``LoadedModel.untrainable``."""
        raise NotImplementedError

    def loaded_model(self) -> LoadedModel:
        """The WebUI's loaded checkpoint: label and family, or why it cannot be trained."""
        from modules import shared

        sd_model = getattr(shared, "sd_model", None)
        if sd_model is None:
            return LoadedModel("(no checkpoint loaded)", None, NO_CHECKPOINT)
        label = checkpoint_label(sd_model)
        family = self.family_of(sd_model)
        if isinstance(family, LoadedModel):
            return family
        return LoadedModel(label, family, weights_cast=self.weights_cast_of(sd_model),
                           compute_dtype=self.compute_dtype_of(sd_model))

    def compute_dtype_of(self, sd_model: Any) -> str | None:
        """The dtype name the UNet computes in (its weights'; ``LoadedModel.compute_dtype``)."""
        try:
            return DTYPE_NAMES.get(next(sd_model.model.diffusion_model.parameters()).dtype)
        except (AttributeError, StopIteration):
            return None

    def weights_cast_of(self, sd_model: Any) -> tuple[str, str] | None:
        """(storage, computation) dtype names when the WebUI stores the UNet narrower than it
        computes and casts each layer's weights per call (``LoadedModel.weights_cast``); else None."""
        return None

    # -- files ------------------------------------------------------------------------------
    def lora_dir(self, config: TrainConfig) -> Path:
        from modules import shared

        custom = str(getattr(shared.opts, "lora_trainer_output_dir", "") or "").strip() if hasattr(shared, "opts") else ""
        folder = Path(custom or getattr(shared.cmd_opts, "lora_dir", "") or "models/Lora")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the LoRA folder {folder} ({e}); check --lora-dir") from e
        return folder

    def refresh_loras(self) -> None:
        networks = webui_networks()
        if networks is None:
            log.warning("the WebUI's Lora extension is not loaded; restart to see the new LoRA")
            return
        networks.list_available_networks()  # a new file is listed now
        self.forget_cached_loras(networks)

    def forget_cached_loras(self, networks: Any) -> None:
        """Make the Lora extension re-read a file re-written under a name it has cached."""

    # -- run control --------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, waiting: Waiting | None = None) -> Iterator[None]:
        from modules import call_queue, shared

        with hold(call_queue.queue_lock, waiting):
            self._lock_owner = threading.get_ident()
            shared.state.begin(job="lora_trainer")
            self._started = time.time()
            try:
                yield
            finally:
                shared.state.end()
                self._lock_owner = None

    def queue(self) -> contextlib.AbstractContextManager[Any]:
        """The WebUI's queue lock, unless this thread holds it already (it is not reentrant)."""
        from modules import call_queue

        return contextlib.nullcontext() if self._lock_owner == threading.get_ident() else call_queue.queue_lock

    def on_event(self, event: TrainEvent) -> None:
        try:
            from modules import shared

            preview = bool(getattr(getattr(shared, "opts", None), "lora_trainer_preview_samples", True))
            report_progress(shared.state, event, preview)
            if event.kind == "sample":  # the tab's Samples gallery shows it next
                make_temp_dir()
        except Exception:  # noqa: BLE001 - progress display must never break training
            log.debug("could not update shared.state", exc_info=True)

    def interrupted(self) -> bool:
        from modules import shared

        return bool(getattr(shared.state, "interrupted", False))

    # -- test render / captions --------------------------------------------------------------
    def render(self, prompt: str, negative_prompt: str, seed: int, lora_name: str,
               weights: list[float], steps: int, width: int, height: int) -> list[Image.Image]:
        from modules import processing, shared

        images: list[Image.Image] = []
        with self.queue(), self._job("lora_trainer_test", len(weights)):
            for w in weights:
                text = f"{prompt} <lora:{lora_name}:{w:g}>" if w else prompt
                p = processing.StableDiffusionProcessingTxt2Img(
                    sd_model=shared.sd_model, prompt=text, negative_prompt=negative_prompt, seed=seed,
                    steps=steps, width=width, height=height, batch_size=1, n_iter=1,
                    do_not_save_samples=True, do_not_save_grid=True)
                try:
                    res = self.process(p)
                finally:
                    p.close()
                images.extend(res.images[:1])
                if shared.state.interrupted or not res.images:
                    raise HostError(f"the render was interrupted after {len(images)} of {len(weights)} image(s)")
        make_temp_dir()  # the Test section's gallery shows them next
        return images

    @contextlib.contextmanager
    def _job(self, name: str, count: int) -> Iterator[None]:
        """A job of the WebUI's own (``shared.state``), as its txt2img runs one: the progress
        bar shows it, its Interrupt stops it, and an Interrupt left over from an earlier
        generation is cleared (``process_images`` renders nothing while it is set). Inside a
        training run (which began its own job) there is nothing to begin."""
        from modules import shared

        if self._lock_owner == threading.get_ident():
            yield
            return
        shared.state.begin(job=name)
        shared.state.job_count = count
        try:
            yield
        finally:
            shared.state.end()

    def process(self, p: Any) -> Any:
        """Run one generation (``processing.process_images``); a WebUI may route it elsewhere."""
        from modules import processing

        return processing.process_images(p)

    @property
    def captioner(self) -> InterrogatorCaptioner | None:
        """The WebUI's BLIP interrogator as a ``Captioner`` (None when the WebUI has none)."""
        from modules import shared

        interrogator = getattr(shared, "interrogator", None)
        if interrogator is None or not hasattr(interrogator, "generate_caption"):
            return None
        return InterrogatorCaptioner(self, interrogator)


class InterrogatorCaptioner:
    """``caption(images)`` through ``shared.interrogator`` (the WebUI's BLIP), as its Interrogate
    does: load, caption, send the models back to RAM, under the queue lock."""

    name = "WebUI BLIP interrogator"

    def __init__(self, host: WebUIHost, interrogator: Any) -> None:
        self.host, self.interrogator = host, interrogator

    def caption(self, images: list[Any]) -> list[str]:
        with self.host.queue():
            try:
                self.interrogator.load()
            except Exception as e:  # noqa: BLE001 - the WebUI's own loader; one line for the page
                raise ModelLoadError(_interrogator_failure(e)) from e
            try:
                return [str(self.interrogator.generate_caption(img) or "").strip() for img in images]
            finally:
                self.interrogator.unload()


# The file A1111's interrogator (v1.10, Forge Classic) downloads into models/BLIP when it finds none
BLIP_FILE = "model_base_caption_capfilt_large.pth"


def _interrogator_failure(error: Exception) -> str:
    """One line for a WebUI interrogator that could not load its models. A1111's model loader
    swallows a failed download and then indexes an empty list: an IndexError that says nothing,
    so a BLIP folder without a model file is named as the cause."""
    folder = None
    with contextlib.suppress(Exception):
        from modules import paths

        folder = Path(paths.models_path) / "BLIP"
    if folder is not None and not any(folder.glob("*.pth")):
        return (f"the WebUI's BLIP interrogator has no model: {folder} holds no .pth file and downloading "
                f"{BLIP_FILE} failed (the WebUI's console says why); put that file there, or write the "
                "captions yourself in the Captions table")
    return (f"the WebUI's BLIP interrogator could not load its models ({one_line(error)}); see the WebUI's "
            "console, or write the captions yourself in the Captions table")


def report_progress(state: Any, event: TrainEvent, preview: bool = True) -> None:
    """Mirror a training event into the WebUI's progress (``shared.state``); ``preview``: sample
    images go to the WebUI's live preview (Settings → Train LoRA)."""
    if event.kind == "step":
        # One job whose "sampling steps" are the training steps: the WebUI's progress bar and
        # ETA then read naturally.
        state.job = "Train LoRA"
        state.job_count = 1
        state.job_no = 0
        state.sampling_steps = max(int(event.total_steps), 1)
        state.sampling_step = int(event.step)
        loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
        state.textinfo = f"Train LoRA: step {event.step}/{event.total_steps}{loss}"
    elif event.kind == "sample" and event.image is not None:
        if preview:
            state.assign_current_image(event.image)
    elif event.message:
        state.textinfo = event.message


def add_api_routes(app: Any, jobs: Callable[[], ApiJobs]) -> None:
    """``/lora_trainer/{train,stop,status,caption}`` on the WebUI's FastAPI app (``on_app_started``).

    ``jobs`` returns the process's ApiJobs (created on first use). fastapi is the WebUI's own."""
    from fastapi import Body, HTTPException

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except HostError as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except LoraTrainerError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e

    @app.post("/lora_trainer/train")
    def lt_api_train(payload: dict = Body(...)) -> dict:
        """Start training; the body is a config (sections, dotted keys or flat aliases)."""
        return {"job_id": call(jobs().start_train, payload)}

    @app.post("/lora_trainer/stop")
    def lt_api_stop(payload: dict = Body(default={})) -> dict:
        return {"stopping": jobs().stop(payload.get("job_id"))}

    @app.get("/lora_trainer/status")
    def lt_api_status(job_id: str | None = None) -> dict:
        return jobs().status(job_id)

    @app.post("/lora_trainer/caption")
    def lt_api_caption(payload: dict = Body(...)) -> dict:
        """Caption a folder: {"folder": ..., "model": "blip", "format": "csv", "trigger": ...}."""
        return {"job_id": call(jobs().start_caption, payload)}
