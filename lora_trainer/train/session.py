"""One training run on one ModelBundle: setup, the loop, checkpoints, outputs, cleanup.

``execute`` reads top to bottom as the run does; each step it names is a short method below.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_trainer.config import SampleConfig, sample_prompts_of
from lora_trainer.data.cache import (
    LATENT_CACHE_BATCH,
    LatentCache,
    TextCache,
    fill_latent_cache,
    module_identity,
)
from lora_trainer.data.dataset import Batch, BucketDataset, EpochView, steps_per_epoch
from lora_trainer.errors import ConfigError, LoraFormatError, OutputError, one_line
from lora_trainer.fsutil import atomic_write_text, backup_file
from lora_trainer.models import placement
from lora_trainer.torch_compat import autocast_supported, enable_hf_checkpointing, grad_scaler
from lora_trainer.train import checkpoint as ckpt
from lora_trainer.train import checkpointing, norms
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.losses import offset_noise, perturbed_noise, pyramid_noise, weighted_loss
from lora_trainer.train.objectives import objective_for
from lora_trainer.train.optim import build_optimizer
from lora_trainer.train.outputs import Logger, dataset_stats, run_config_copies, run_folder, save_sample, write_summary
from lora_trainer.train.result import TrainResult, seed_everything
from lora_trainer.train.schedules import make_scheduler

if TYPE_CHECKING:
    from lora_trainer.hosts.base import Host
    from lora_trainer.models.bundle import ModelBundle
    from lora_trainer.train.trainer import Trainer

log = logging.getLogger(__name__)

_SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _identity(x: Any) -> Any:
    return x


# What autosave_minutes measures time with (a test may turn it forward).
clock = time.monotonic


class RunSession:
    def __init__(self, trainer: Trainer, host: Host, bundle: ModelBundle, report: Any) -> None:
        self.trainer, self.host, self.bundle, self.dataset_report = trainer, host, bundle, report
        self.cfg = trainer.config
        self.device = torch.device(bundle.device)
        amp = _AMP_DTYPES.get(self.cfg.train.mixed_precision)
        if amp is not None and not autocast_supported(self.device.type, amp):
            raise ConfigError(f"train.mixed_precision: {self.cfg.train.mixed_precision} does not run on "
                              f"{self.device.type} with torch {torch.__version__}; choose bf16 or no")
        # Captions are read as plain text, or with the WebUI's emphasis syntax (data.weighted_captions);
        # sample prompts as prompts, with it wherever the model has it (as txt2img and kohya's samples).
        self.caption_encoder = bundle.encode_weighted if self.cfg.data.weighted_captions else bundle.encode_text
        if self.caption_encoder is None:
            raise ConfigError(f"data.weighted_captions: this {bundle.arch} model cannot weigh caption tokens (the "
                              "SD1, SD2 and SDXL families can); set it to false")
        self.prompt_encoder = bundle.encode_weighted or bundle.encode_text
        chunks = self.cfg.data.token_chunks
        if chunks > 1 and bundle.make_encoder is not None:  # longer captions, and prompts to match
            self.caption_encoder = bundle.make_encoder(self.cfg.data.weighted_captions, chunks)
            self.prompt_encoder = bundle.make_encoder(True, chunks)
        self.out = Path(self.cfg.output.output_dir)
        self.network: Any = None
        self.text_cache: TextCache | None = None  # the captions'
        self.prompt_cache: TextCache | None = None  # the sample prompts'
        self.latent_cache: LatentCache | None = None
        self.pos = ckpt.LoopPosition()
        self.final_loss: float | None = None
        self.last_sample: Any = None
        self.max_norm_stats: tuple[torch.Tensor, torch.Tensor] | None = None  # scale_weight_norms' last step
        self.last_sample_step = -1
        self.last_checkpoint_step = -1
        self.last_save_time = self.last_sample_time = clock()
        self.started = time.time()
        self.run_id = uuid.uuid4().hex  # marks this run's LoRA files (a resume takes the checkpoint's)
        self._stem: str | None = None  # the LoRA name this run writes (<name>, or <name>_v2...), fixed at first use
        self._undo: list[Any] = []  # callables that put the model back as the host gave it
        self.logger: Logger | None = None
        self._train_flags: dict[int, bool] = {}
        self._cast_once: Any = None  # LoraWeightsCastOnce under autocast (speed_up_unet)
        self.compiled: Any = None  # CompiledDenoiser with train.compile (speed_up_unet)

    # == the run, top to bottom ============================================================
    def execute(self) -> TrainResult:
        cfg = self.cfg
        self.started = started = time.time()
        # -- seed and outputs
        seed_everything(cfg.train.seed)
        self.gen = torch.Generator(self.device).manual_seed(cfg.train.seed)
        self.objective = objective_for(self.bundle, cfg.train.min_snr_gamma, cfg.train)
        self.write_config(self.out)
        # -- data and caches (before LoRA, so the frozen text encoders and the VAE can leave the GPU)
        self.setup_data()
        self.check_memory()
        self.setup_caches()
        # -- LoRA, optimizer, schedule, precision
        self.setup_network()
        self.setup_optimizer()
        self.resume()
        self.write_config(run_folder(self.out, "logs", self.stem))  # the name is known once a resume has set it
        self.logger = Logger(run_folder(self.out, "logs", self.stem), cfg.output.tensorboard)
        if cfg.sample.at_first and self.pos.step == 0:
            self.sample()  # the model before training, to compare the samples with
        # -- the loop
        self.status(f"training {self.total_steps} steps ({self.ds.batches_per_epoch()} batches per epoch)")
        stopped = self.loop()
        # -- outputs
        if self.sample_settings() and self.last_sample_step != self.pos.step and not stopped:
            self.sample()
        lora_path = self.save_lora()
        if stopped and self.last_checkpoint_step != self.pos.step:
            self.checkpoint(step_lora=False)  # after the small LoRA, so a full disk loses the least
        if not stopped:
            ckpt.mark_finished(self.out, self.stem, self.pos.step)  # its checkpoints are no longer unfinished
        own = run_folder(self.out, "logs", self.stem)
        summary = dict(status="stopped" if stopped else "done", steps=self.pos.step, total_steps=self.total_steps,
                       epoch=self.epoch_number, final_loss=self.final_loss, seconds=round(time.time() - started, 2),
                       lora_path=str(lora_path), output_dir=str(self.out), images=len(self.ds.items))
        write_summary(own, **summary, config=str(own / "config.yaml"))  # this run's, beside its logs
        write_summary(self.out, **summary, config=str(self.out / "config.yaml"))  # the latest run's
        return TrainResult(lora_path, self.pos.step, self.final_loss, stopped, self.out)

    def loop(self) -> bool:
        """Train until total_steps or a stop; returns True when stopped early."""
        t = self.cfg.train
        accum = t.gradient_accumulation_steps
        log_every = 1 if self.device.type == "cpu" else 10  # one host sync per N steps on GPUs
        if self.pos.step >= self.total_steps:
            return False
        self.set_train_mode(True)
        with contextlib.closing(self.loaded_batches()) as batches:
            return self.loop_over(batches, accum, log_every)

    def loop_over(self, batches: Iterator[tuple[int, int, Batch]], accum: int, log_every: int) -> bool:
        t = self.cfg.train
        window = torch.zeros((), device=self.device)
        window_steps, micro, t0 = 0, 0, time.monotonic()
        self.last_save_time = self.last_sample_time = clock()
        for epoch, position, batch in batches:
            # -- forward and backward on one micro-batch
            window += self.micro_step(batch, accum)
            self.pos.epoch, self.pos.position = epoch, position + 1
            micro += 1
            if micro % accum:
                continue
            # -- optimizer step
            self.optimizer_step()
            self.pos.step += 1
            window_steps += 1
            # -- report (reading the loss is the only host sync)
            if self.pos.step % log_every == 0 or self.pos.step == self.total_steps:
                self.report(window, window_steps, time.monotonic() - t0)
                window, window_steps, t0 = torch.zeros((), device=self.device), 0, time.monotonic()
            # -- commands, checkpoints, samples
            stop = self.trainer.commands.stop_requested or self.host_interrupted()
            every = t.save_steps
            if not stop and (self.trainer.commands.take_save() or (every and self.pos.step % every == 0)
                             or self.at_epoch_end(t.save_every_n_epochs)):
                self.checkpoint()  # a stop saves after the loop: the final LoRA, then the checkpoint
            elif not stop and t.autosave_minutes and clock() - self.last_save_time >= t.autosave_minutes * 60:
                self.checkpoint(step_lora=False)  # a checkpoint to resume from, not a LoRA to compare
            if self.trainer.commands.take_sample() or (self.sample_settings() and self.sample_due()):
                self.sample()
            if stop:
                self.status(f"stopped at step {self.pos.step}")
                return True
            if self.pos.step >= self.total_steps:
                return False
        return False

    # == setup ============================================================================
    def setup_data(self) -> None:
        t = self.cfg.train
        self.ds = BucketDataset(self.dataset_report.items, self.cfg.data, t.batch_size, t.seed)
        self.steps_per_epoch = per_epoch = steps_per_epoch(self.ds, t.gradient_accumulation_steps)
        self.total_steps = t.max_train_steps or t.epochs * per_epoch

    def at_epoch_end(self, every: int) -> bool:
        """Whether the step just taken ends an epoch whose number is a multiple of ``every`` (0: never)."""
        return bool(every) and self.pos.step % (self.steps_per_epoch * every) == 0

    def check_memory(self) -> None:
        """On a GPU: the run's memory estimate, with all its settings, against what the card has
        for it; one line when it will likely run out (train/memory_check.py), before the caches
        fill. An estimate that cannot be made never stops a run."""
        from lora_trainer.train import memory_check

        b = self.bundle
        available = memory_check.available_gb(self.device, [b.unet, b.vae, *(p.module for p in b.text_encoders)])
        if available is None:
            return
        loaded = self.host.loaded_model()
        try:
            est = memory_check.run_estimate(self.cfg, b.arch, variant=b.extras.get("variant", ""),
                                            captions_fixed=self.ds.fixed_captions() is not None,
                                            weights_cast=loaded.weights_cast if loaded is not None else None)
        except Exception as e:  # noqa: BLE001 - a model the estimate does not know trains all the same
            log.warning("no memory estimate for this run: %s", one_line(e))
            return
        self.trainer.memory_estimate = est
        warning = memory_check.memory_warning(self.cfg, est, available, str(self.device))
        if warning is not None:
            self.status(warning)

    def setup_caches(self) -> None:
        """Text conditioning and latents computed once, each encoder alone on the card: the
        denoiser is parked meanwhile (Flux's transformer and T5-XXL together would not fit a
        16 GB card), and the frozen text encoders and the VAE leave it when done."""
        captions, latents = self.captions_to_cache(), self.latents_to_cache()
        if captions is not None or latents:
            with placement.parked(self.bundle.unet):  # back on the card when both caches are filled
                if captions is not None:
                    self.cache_text(captions)
                if latents:
                    self.cache_latents()
        self.place_denoiser()

    def place_denoiser(self) -> None:
        """A denoiser its loader left in the host's memory goes to its device now that the caches
        are filled (and back at the end, after which the encoders return)."""
        moved = placement.place_denoiser(self.bundle)
        if moved is not None:
            module, where = moved
            self._undo.append(lambda: placement.move(module, where))

    def captions_to_cache(self) -> list[str] | None:
        """The captions to encode once (the sample prompts come with them); None when the text is
        encoded per step."""
        captions = self.ds.fixed_captions()
        if self.cfg.network.train_text_encoder or not self.cfg.data.cache_text_embeddings or captions is None:
            return None
        return captions

    def latents_to_cache(self) -> bool:
        if self.cfg.data.cache_latents == "off" or self.bundle.vae is None:
            return False
        if not self.ds.fixed_crop:
            self.status(f"latent cache skipped: {self.ds.varying_pixels} change the latents every epoch")
            return False
        return True

    def cache_text(self, captions: list[str]) -> None:
        b = self.bundle
        self.status(f"caching text embeddings of {len(captions)} captions")
        with placement.parked(b.vae):  # the text encoders alone; they leave before the VAE is back
            # one pass over captions and prompts where both are read alike (one cache for both)
            same = self.prompt_encoder is self.caption_encoder
            self.text_cache = TextCache(self.caption_encoder, captions + (self.sample_prompts() if same else []))
            self.prompt_cache = self.text_cache if same else TextCache(self.prompt_encoder, self.sample_prompts())
            for part in b.text_encoders:
                self.offload(part.module)

    def cache_latents(self) -> None:
        b, d = self.bundle, self.cfg.data
        vae_id = module_identity(b.vae, extra=f"{b.arch}|{b.vae_scale_factor}")
        folder = Path(d.cache_dir) if d.cache_dir else self.out / ".cache" / "latents"
        self.latent_cache = LatentCache(d.cache_latents, vae_id, d.crop, folder)
        self.status("caching latents")
        fill_latent_cache(self.ds, self.latent_cache, b, LATENT_CACHE_BATCH)  # in the denoiser's room
        self.status(f"latent cache: {self.latent_cache.hits} reused, {self.latent_cache.misses} encoded")
        self.ds.latent_cache = self.latent_cache
        self.offload(b.vae)

    def setup_network(self) -> None:
        from lora_trainer.lora.inject import inject_lora

        self.network = inject_lora(self.bundle, self.cfg.network)
        self.params = self.network.parameters()
        self.status(f"LoRA: {sum(p.numel() for p in self.params):,} trainable parameters")
        if self.save_dtype() != _SAVE_DTYPES[self.cfg.output.save_precision]:
            self.status(f"LoRA files are written in fp32, not {self.cfg.output.save_precision}: on the CPU this "
                        f"WebUI cannot apply {self.network.kind} weights stored in fp16")
        if self.cfg.train.gradient_checkpointing:
            self.enable_checkpointing()
        self.speed_up_unet()

    def speed_up_unet(self) -> None:
        """channels_last convolutions on CUDA, no needless dtype casts in the LoRA layers under
        autocast and their weights cast in one kernel (train/speed.py), the norms in the compute
        dtype (train/norms.py; CUDA autocast would run them in fp32; not compiled: inductor fuses
        those casts into the norms' kernels), the lean LoRA forward
        (train/lora_forward.py) or else torch.compile when asked (train/compiled.py); all undone
        at the end so a host's live model is handed back as it came."""
        unet = self.bundle.unet
        if self.device.type == "cuda":
            unet.to(memory_format=torch.channels_last)
            self._undo.append(lambda: unet.to(memory_format=torch.contiguous_format))
        amp = _AMP_DTYPES.get(self.cfg.train.mixed_precision)
        if amp is not None:
            from lora_trainer.train.speed import LoraWeightsCastOnce, skip_lora_input_casts

            for root in self.roots_in_training():
                self._undo.append(skip_lora_input_casts(root))
                if not (self.cfg.train.fp32_norms or self.cfg.train.compile) and self.device.type in norms.UPCASTING:
                    self._undo.append(norms.norms_in_compute_dtype(root))
            if not self.cfg.train.compile:
                self._cast_once = LoraWeightsCastOnce(self.roots_in_training(), amp)
        if not self.cfg.train.compile:
            from lora_trainer.train.lora_forward import lean_lora_forward

            for root in self.roots_in_training():
                self._undo.append(lean_lora_forward(root))
        if self.cfg.train.compile:
            from lora_trainer.train.compiled import CompiledDenoiser, batch_shapes

            shapes = len(batch_shapes(self.ds.plan(0)))
            self.compiled = CompiledDenoiser(unet, self.cfg.train.compile_mode, shapes, self.device.type)
            self._undo.append(self.compiled.start())
            self.status(self.compiled.status())

    def setup_optimizer(self) -> None:
        o, t = self.cfg.optim, self.cfg.train
        unet_lr = o.unet_lr if o.unet_lr is not None else o.learning_rate
        te_lr = o.text_encoder_lr if o.text_encoder_lr is not None else o.learning_rate
        self.optimizer = build_optimizer(self.network.param_groups(unet_lr, te_lr, o.loraplus_lr_ratio), o, self.device)
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, o.lr_warmup_steps,
                                        o.lr_scheduler, o.lr_num_cycles, o.lr_scheduler_power)
        amp = _AMP_DTYPES.get(t.mixed_precision)
        self.amp_dtype = amp
        self.scaler = grad_scaler(self.device.type, enabled=t.mixed_precision == "fp16")

    def resume(self) -> None:
        if not self.cfg.train.resume:
            return
        name = self.cfg.output.output_name
        found = ckpt.find_checkpoint(self.cfg.train.resume, self.out, name)
        if found is None:
            others = ckpt.checkpoint_names(self.out)
            elsewhere = f" (there are checkpoints of {', '.join(others)})" if others else ""
            self.status(f"train.resume: no checkpoint of '{name}' in {ckpt.checkpoints_dir(self.out)} yet{elsewhere}; "
                        "starting fresh")
            return
        pos, lora_state, state = ckpt.load_checkpoint(found)
        run = ckpt.checkpoint_run(found)
        if run.get("run_id"):  # the same run goes on: it writes over its own files, not a _v2
            self.run_id = run["run_id"]
            stem = run.get("lora_name") or ""
            if ckpt.runs_named(name).fullmatch(stem):  # not when renamed since
                self._stem = stem
        try:
            self.network.load_state_dict(lora_state)
        except LoraFormatError as e:
            raise ConfigError(f"train.resume: {found} was saved by a run with other network settings ({e}); resume "
                              f"with the settings in its config.yaml, or clear train.resume to start afresh") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_states(state["rng"], self.gen)
        self.pos = pos
        self.status(f"resumed from {found} at step {pos.step}")

    # == one step ==========================================================================
    def batches(self) -> Iterator[tuple[int, int, Batch]]:
        """(epoch, position, batch) from the current position on, epoch after epoch."""
        epoch, start = self.pos.epoch, self.pos.position
        workers = self.cfg.data.num_workers
        while True:
            view = EpochView(self.ds, epoch, start)
            loader: Any = view if workers == 0 else torch.utils.data.DataLoader(
                view, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity)
            for n, batch in enumerate(loader):
                yield epoch, start + n, batch
            epoch, start = epoch + 1, 0

    def loaded_batches(self) -> Iterator[tuple[int, int, Batch]]:
        """:meth:`batches`, loaded ahead in a background thread (``data.prefetch``; by default on
        accelerators only) and, on CUDA, pinned so the copy to the GPU does not wait for the
        host. Worker processes (``data.num_workers``) already load ahead."""
        from lora_trainer.data.prefetch import prefetch

        pin = self.device.type == "cuda"

        def pinned(item: tuple[int, int, Batch]) -> tuple[int, int, Batch]:
            return item[0], item[1], item[2].pin_memory()

        depth = self.cfg.data.prefetch
        if depth is None:
            depth = 0 if self.device.type == "cpu" else 2
        if self.cfg.data.num_workers:
            depth = 0
        return prefetch(self.batches(), depth, prepare=pinned if pin else None)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def lora_weights_cast_once(self) -> contextlib.AbstractContextManager[Any]:
        """Under autocast, the LoRA weights cast to its dtype in one kernel (train/speed.py), for
        a step's forward and backward pass."""
        return self._cast_once.active() if self._cast_once is not None else contextlib.nullcontext()

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of a batch's captions (cached, or encoded now)."""
        return self._encoded(captions, self.text_cache, self.caption_encoder)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The conditioning of sample prompts, read as prompts (cached, or encoded now)."""
        return self._encoded(prompts, self.prompt_cache, self.prompt_encoder)

    def _encoded(self, texts: list[str], cache: TextCache | None, encode: Any) -> dict[str, torch.Tensor]:
        if cache is not None:
            missing = [c for c in texts if c not in cache]
            if missing:  # not foreseen (a prompt given later): encode once, encoders back for a moment
                with contextlib.ExitStack() as stack:
                    for part in self.bundle.text_encoders:
                        stack.enter_context(self.onloaded(part.module))
                    cache.add(encode, missing)
            return {k: v.to(self.device) for k, v in cache.get(texts).items()}
        if self.cfg.network.train_text_encoder:
            return encode(texts)
        with torch.no_grad():
            return encode(texts)

    def micro_step(self, batch: Batch, accum: int) -> torch.Tensor:
        b, t = self.bundle, self.cfg.train
        if batch.latents is not None:
            latents = batch.latents.to(self.device, torch.float32, non_blocking=True)
        else:
            with torch.no_grad():
                latents = b.encode_images(batch.pixels.to(self.device, b.dtype, non_blocking=True)).float()
        noise = offset_noise(latents, t.noise_offset, self.gen, t.noise_offset_random_strength, t.adaptive_noise_scale)
        noise = pyramid_noise(noise, t.multires_noise_iterations, t.multires_noise_discount, self.gen)
        input_noise = perturbed_noise(noise, t.ip_noise_gamma, t.ip_noise_gamma_random_strength, self.gen)
        step = self.objective.step_inputs(latents, noise, self.gen, input_noise)
        size_info = batch.size_info.to(self.device, non_blocking=True) if b.family.uses_size_info else None
        if self.compiled is not None:
            self.compiled.step_begin()
        # the LoRA weights' low-precision copy stays in the layers through the backward pass too:
        # checkpointed blocks recompute their forward there and use it instead of casting again
        with self.lora_weights_cast_once():
            with self.autocast():
                cond = {**self.encode_text(batch.captions), **step.cond}
                pred = b.predict(step.noisy.to(b.dtype), step.timesteps, cond, size_info)
            weights = batch.weights.to(self.device, non_blocking=True)
            if step.weights is not None:
                weights = weights * step.weights
            mask = self.loss_mask(batch, latents)
            loss = weighted_loss(pred, step.target, weights, t.loss_type, step.threshold, mask) / accum
            self.scaler.scale(loss).backward()
        return loss.detach()

    def loss_mask(self, batch: Batch, latents: torch.Tensor) -> torch.Tensor | None:
        """The batch's alpha masks (data.alpha_mask) on the device at the latents' H x W (area
        interpolation should the VAE's downscale differ from the dataset's); None without."""
        if batch.masks is None:
            return None
        mask = batch.masks.to(self.device, torch.float32, non_blocking=True)
        if mask.shape[-2:] != latents.shape[-2:]:
            mask = torch.nn.functional.interpolate(mask, size=tuple(latents.shape[-2:]), mode="area")
        return mask

    def optimizer_step(self) -> None:
        if self.cfg.optim.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.network.scale_weight_norms:
            self.max_norm_stats = self.network.apply_max_norm(self.cfg.network.scale_weight_norms)

    def report(self, window: torch.Tensor, steps: int, seconds: float) -> None:
        loss = float(window.item()) / max(1, steps)
        self.final_loss = loss
        # the base rate: the first group's, without its block weight (LoRA+ groups come after)
        lr = float(self.scheduler.get_last_lr()[0]) / (self.optimizer.param_groups[0].get("lr_scale") or 1.0)
        it_s = steps / seconds if seconds > 0 else None
        eta = (self.total_steps - self.pos.step) / it_s if it_s else None
        if self.logger is not None:
            scaled, largest = (float(v) for v in self.max_norm_stats) if self.max_norm_stats else (None, None)
            self.logger.scalars(self.pos.step, loss=loss, lr=lr, keys_scaled=scaled, max_key_norm=largest)
        self.trainer.emit(TrainEvent("step", step=self.pos.step, total_steps=self.total_steps,
                                     epoch=self.epoch_number, loss=loss, lr=lr, it_per_s=it_s, eta_s=eta))

    # == saving ============================================================================
    def checkpoint(self, step_lora: bool = True) -> Path:
        # The step's LoRA first: it is small and usable on its own if the disk fills up.
        lora = self.save_step_lora() if step_lora and self.cfg.output.save_step_loras else None
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": ckpt.rng_states(self.gen)}
        path = ckpt.save_checkpoint(self.out, self.pos, self.network.state_dict(), state,
                                    self.cfg.to_yaml(), self.cfg.output.keep_checkpoints,
                                    run={"run_id": self.run_id, "lora_name": self.stem},
                                    total_steps=self.total_steps)
        self.last_checkpoint_step, self.last_save_time = self.pos.step, clock()
        self.trainer.emit(TrainEvent("checkpoint", step=self.pos.step, total_steps=self.total_steps,
                                     path=str(path), message=f"checkpoint {path}"
                                     + (f"; LoRA of this step: {lora.stem}" if lora else "")))
        return path

    @property
    def stem(self) -> str:
        """The LoRA name this run writes (``<output_name>``, or ``<output_name>_v2``... when
        another run's file has that name); its logs, samples and checkpoints are kept under it."""
        return self.lora_path().stem

    def lora_path(self, suffix: str = "") -> Path:
        """``<lora_dir>/<name><suffix>.safetensors`` of this run. <name> is fixed at the first
        save (``<name>_v2`` when another run's <name> exists); files this run wrote are its own
        to replace, so a resumed run keeps its name."""
        from lora_trainer.lora.files import resolve_output_path

        o, folder = self.cfg.output, self.host.lora_dir(self.cfg)
        if self._stem is None:  # a name whose checkpoints are another run's is taken too (Continue goes on with them)
            self._stem = resolve_output_path(folder, o.output_name, o.overwrite, self.run_id,
                                             taken=lambda stem: ckpt.held_by_other_run(self.out, stem, self.run_id)).stem
        return resolve_output_path(folder, self._stem + suffix, o.overwrite, self.run_id)

    def save_step_lora(self) -> Path:
        """``<lora_dir>/<name>-stepNNNNNN.safetensors``: this step's LoRA in the same format as
        the final one, so the Test section (and the WebUI) can render any saved step."""
        return self.write_lora(self.lora_path(f"-step{self.pos.step:06d}"))

    def save_lora(self) -> Path:
        path = self.write_lora(self.lora_path())
        if self.last_sample is not None:
            from lora_trainer.lora.files import save_preview_png

            save_preview_png(path, self.last_sample)
        self.status(f"LoRA written to {path}")
        return path

    def save_dtype(self) -> torch.dtype:
        """output.save_precision's dtype, unless the host cannot apply this kind of LoRA in fp16."""
        dtype = _SAVE_DTYPES[self.cfg.output.save_precision]
        need = self.bundle.lycoris_save_dtype
        if need is not None and dtype == torch.float16 and self.network.kind in ("loha", "lokr"):
            return need
        return dtype

    def write_lora(self, path: Path) -> Path:
        """The LoRA as it is now, in kohya format with its metadata, at ``path`` (atomically)."""
        from lora_trainer.lora.files import RUN_KEY, save_lora_file
        from lora_trainer.lora.metadata import build_metadata

        tensors = self.network.to_kohya(dtype=self.save_dtype())
        tags, dirs = dataset_stats(self.ds.items)
        # Rank and alpha as written (with init_from they come from that file, not the config).
        rank, alpha = self.network.network_dim, self.network.network_alpha
        metadata = build_metadata(
            self.cfg, self.bundle, num_images=sum(not it.is_reg for it in self.ds.items), tag_frequency=tags,
            dataset_dirs=dirs, steps=self.pos.step, epoch=self.epoch_number, started_at=self.started,
            finished_at=time.time(), rank=rank, alpha=alpha, output_name=path.stem, lokr=self.network.lokr)
        if path.exists():  # this run's own earlier file (a resumed run) or overwrite: kept in .backup
            backup_file(path)
        try:
            save_lora_file(path, tensors, {**metadata, RUN_KEY: self.run_id})
        except OutputError as e:
            raise OutputError(f"{e}; {ckpt.resume_hint(self.out, self.cfg.output.output_name)}") from None
        self.host.refresh_loras()
        return path

    def sample_due(self) -> bool:
        """Whether this step renders a sample: its step, its epoch's end, or the minutes since the last."""
        s = self.cfg.sample
        return bool((s.every_n_steps and self.pos.step % s.every_n_steps == 0) or self.at_epoch_end(s.every_n_epochs)
                    or (s.every_n_minutes and clock() - self.last_sample_time >= s.every_n_minutes * 60))

    def sample(self) -> None:
        from lora_trainer.train.sampler import render_sample

        settings, res = self.sample_settings(), self.cfg.data.resolution
        if not settings:
            self.status("no sample prompt set (sample.prompt); skipping the sample")
            return
        self.set_train_mode(False)
        try:
            with self.onloaded(self.bundle.vae), self.compiled.paused() if self.compiled else contextlib.nullcontext():
                images = [render_sample(self.bundle, s, s.width or res, s.height or res,
                                        encode=self.encode_prompts, autocast=self.autocast) for s in settings]
        finally:
            self.set_train_mode(True)
        folder = run_folder(self.out, "samples", self.stem)
        for n, img in enumerate(images):  # the first prompt's is also the LoRA's preview card
            path = save_sample(folder, self.pos.step, img, n)
            if self.logger is not None:
                self.logger.image(self.pos.step, img, n)
            self.trainer.emit(TrainEvent("sample", step=self.pos.step, total_steps=self.total_steps,
                                         image=img, path=str(path)))
        self.last_sample, self.last_sample_step, self.last_sample_time = images[0], self.pos.step, clock()

    # == helpers ===========================================================================
    @property
    def epoch_number(self) -> int:
        """The epoch the last step belongs to, counted from 1 as kohya does (0 before any step);
        ``pos.epoch`` is the 0-based index the data order uses."""
        return self.pos.epoch + 1 if self.pos.step else 0

    def write_config(self, folder: Path) -> None:
        """``folder/config.yaml``: <output_dir>'s is the latest run's, logs/<lora name>'s this run's
        (kept when other runs share the folder). A different file already there is backed up
        first, unless it is an earlier run's config that its logs folder keeps anyway (so runs
        sharing a folder, as a WebUI's all do, do not pile up backups)."""
        target, text = folder / "config.yaml", self.cfg.to_yaml()
        folder.mkdir(parents=True, exist_ok=True)
        old = target.read_text(encoding="utf-8", errors="replace") if target.is_file() else text
        if old != text and not [p for p in run_config_copies(self.out, old) if p != target]:
            backup_file(target)
        atomic_write_text(target, text)

    def status(self, message: str) -> None:
        log.debug(message)  # the CLI and UIs show status events; logging them too would print twice
        self.trainer.emit(TrainEvent("status", step=self.pos.step, message=message))

    def host_interrupted(self) -> bool:
        try:
            return bool(self.host.interrupted())
        except Exception:  # noqa: BLE001 - a host bug must not end a run without a save
            log.exception("host.interrupted() failed")
            return False

    def sample_settings(self) -> list[SampleConfig]:
        """The run's sample prompts (sample.prompt's lines), each with its own settings."""
        return sample_prompts_of(self.cfg.sample)

    def sample_prompts(self) -> list[str]:
        """Every text a sample encodes (negative and positive prompts)."""
        return [text for s in self.sample_settings() for text in (s.negative_prompt, s.prompt)]

    def offload(self, module: Any) -> None:
        """Move a module that is only needed for caching off the accelerator (put back at the end)."""
        home = placement.device_of(module)
        if home is None or not placement.on_accelerator(module):  # nothing on a card to free
            return
        placement.move(module, placement.PARK)
        self._undo.append(lambda: placement.move(module, home))
        placement.release_cached(home)

    @contextlib.contextmanager
    def onloaded(self, module: Any) -> Iterator[None]:
        """Bring an offloaded module back to the accelerator for a moment (sample decoding)."""
        where = placement.device_of(module)
        if where is None or where == self.device or self.device.type == "cpu":
            yield
            return
        placement.move(module, self.device)
        try:
            yield
        finally:
            placement.move(module, where)

    def roots_in_training(self) -> list[Any]:
        b, n = self.bundle, self.cfg.network
        roots = [b.unet] if n.train_unet else []
        return roots + ([m for k, m in b.trainable_roots().items() if k != "unet"] if n.train_text_encoder else [])

    def set_train_mode(self, on: bool) -> None:
        """Training mode on the trained roots (LoRA dropout, checkpointing); the host's flags are restored."""
        for m in self.roots_in_training():
            if id(m) not in self._train_flags:
                self._train_flags[id(m)] = m.training
                self._undo.append(lambda m=m, was=m.training: m.train(was))
            m.train(on)

    def enable_checkpointing(self) -> None:
        """Checkpointing of ``train.checkpointing_share`` of the denoiser's blocks (every host:
        train/checkpointing.py) and of the text encoders that train (their own switch)."""
        b, share = self.bundle, self.cfg.train.checkpointing_share
        for m in self.roots_in_training():
            units = checkpointing.units(m) if m is b.unet else []
            if units:
                self._undo.append(checkpointing.checkpoint(m, share))
                self.status(f"gradient checkpointing: {checkpointing.count(m)} of the {len(units)} blocks "
                            "recompute their activations")
            elif hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
                self._undo.append(m.disable_gradient_checkpointing)
            elif hasattr(m, "gradient_checkpointing_enable"):
                self._undo.append(enable_hf_checkpointing(m))

    def cleanup(self) -> None:
        """Always: LoRA layers out, modules back where and how the host gave them, logs closed."""
        if self.logger is not None:
            self.logger.close()
        if self.network is not None:
            self.network.remove()
            self.network = None
        # AdamW's moments leave the card before the text encoders and the VAE come back to it
        for name in ("optimizer", "scheduler", "params", "_cast_once"):
            if hasattr(self, name):
                setattr(self, name, None)
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception:  # noqa: BLE001 - keep restoring the rest
                log.exception("restoring the model after training failed")
        self._undo.clear()
