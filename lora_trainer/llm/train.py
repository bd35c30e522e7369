"""The text-LoRA training loop: load, inject LoRA, train, checkpoint, evaluate, save.

Events go out through the same :class:`TrainEvent` callbacks as image training, and the same
:class:`Commands` flags (stop, save) are checked once per optimizer step, so the CLI's progress
bar and the app's Text LoRA section follow a run the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lora_trainer.errors import ConfigError
from lora_trainer.llm.checkpoint import (
    Position,
    checkpoints_root,
    find_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resolve_adapter_dir,
    save_adapter,
    save_checkpoint,
    write_folder_atomic,
)
from lora_trainer.llm.config import LLMTrainConfig
from lora_trainer.llm.data import IGNORE, DataReport, Sample, build_datasets, collate
from lora_trainer.llm.model import add_lora, load_model, resolve_device, run_precision
from lora_trainer.torch_compat import enable_hf_checkpointing, grad_scaler
from lora_trainer.train.events import Callback, TrainEvent, WorkerRun, emit
from lora_trainer.train.outputs import Logger, run_folder

log = logging.getLogger(__name__)


@dataclass
class TextTrainResult:
    adapter_path: Path | None
    merged_path: Path | None
    steps: int
    final_loss: float | None
    eval_loss: float | None
    stopped: bool
    output_dir: Path
    report: DataReport | None = None


# -- small pure pieces ---------------------------------------------------------------------------

def epoch_groups(n: int, batch_size: int, accum: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """This epoch's sample order as optimizer steps -> micro-batches -> sample indices.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i:i + accum] for i in range(0, len(batches), accum)]


def total_steps(n: int, cfg: LLMTrainConfig) -> int:
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    return t.epochs * math.ceil(math.ceil(n / t.batch_size) / t.gradient_accumulation_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: LLMTrainConfig, steps: int) -> Any:
    """The same schedule kinds as image training, from transformers' implementations."""
    # The schedule functions themselves: get_scheduler's scheduler_specific_kwargs is newer than
    # the transformers 4.30 of the A1111 WebUI.
    import transformers as tf

    o = cfg.optim
    if o.lr_scheduler == "constant":
        return tf.get_constant_schedule_with_warmup(optimizer, o.lr_warmup_steps)
    make = {"linear": tf.get_linear_schedule_with_warmup, "cosine": tf.get_cosine_schedule_with_warmup,
            "cosine_with_restarts": tf.get_cosine_with_hard_restarts_schedule_with_warmup}[o.lr_scheduler]
    extra = {"num_cycles": o.lr_num_cycles} if o.lr_scheduler == "cosine_with_restarts" else {}
    return make(optimizer, o.lr_warmup_steps, steps, **extra)


def target_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss (the model shifts labels by one inside its loss)."""
    return int((labels[:, 1:] != IGNORE).sum())


def check_same_data(ckpt: Path, n_train: int, steps: int) -> None:
    """Refuse to resume on other data or another length: the data position would be meaningless."""
    saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    if saved.get("train_samples", n_train) != n_train:
        raise ConfigError(f"train.resume: {ckpt} was trained on {saved['train_samples']} samples, the data now "
                          f"gives {n_train}; resume with the same data.train_file and data settings")
    if saved.get("total_steps", steps) != steps:
        raise ConfigError(f"train.resume: {ckpt} belongs to a run of {saved['total_steps']} steps, this config "
                          f"gives {steps}; keep epochs/max_steps/batch settings as they were")


def with_run_precision(cfg: LLMTrainConfig) -> LLMTrainConfig:
    """``cfg`` with ``train.mixed_precision: auto`` made the precision the run trains in on its
    device, so the saved config and a resume name it."""
    if cfg.train.mixed_precision != "auto":
        return cfg
    precision = run_precision("auto", resolve_device(cfg.model.device))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=precision))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -- the trainer -----------------------------------------------------------------------------------

class TextLoraTrainer(WorkerRun):
    """One text-LoRA run: ``run()`` blocks; ``start()`` runs it in a worker thread."""

    thread_name = "lora-trainer-llm"
    job_label = "text LoRA training"

    def __init__(self, config: LLMTrainConfig, callbacks: list[Callback] | None = None) -> None:
        super().__init__(callbacks)
        self.config = config
        self.result: TextTrainResult | None = None
        self.model: Any = None  # the trained peft model (LoRA not merged), for trying it out after the run
        self.tokenizer: Any = None

    def _emit(self, kind: str, **kw: Any) -> None:
        ev = TrainEvent(kind=kind, **kw)  # type: ignore[arg-type]
        self.state.update(ev)
        emit(self.callbacks, ev)

    def run(self) -> TextTrainResult:
        try:
            self.result = self._run()
            return self.result
        except Exception as e:
            self._emit("error", message=str(e))
            raise

    def _run(self) -> TextTrainResult:
        cfg = self.config = with_run_precision(self.config)
        out = Path(cfg.output.output_dir)
        self._emit("status", message=f"loading {cfg.model.base_model}")
        model, tokenizer, device = load_model(cfg.model, cfg.train.mixed_precision)
        train, evals, report = build_datasets(cfg.data, tokenizer, cfg.train.seed)
        self._emit("status", message=report.summary())
        seed_everything(cfg.train.seed)
        peft_model, targets = add_lora(model, cfg.network, cfg.train.seed)
        self._emit("status", message=f"LoRA rank {cfg.network.rank} alpha {cfg.network.alpha} on {', '.join(targets)}")
        if cfg.train.gradient_checkpointing:
            base = peft_model.base_model.model
            base.config.use_cache = False
            enable_hf_checkpointing(base)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        o = cfg.optim
        optimizer = torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                      eps=o.adam_epsilon, weight_decay=o.weight_decay)
        steps = total_steps(len(train), cfg)
        scheduler = make_scheduler(optimizer, cfg, steps)
        scaler = grad_scaler(device.type, enabled=device.type == "cuda" and cfg.train.mixed_precision == "fp16")
        pos = Position()
        if cfg.train.resume:
            ckpt = find_checkpoint(out, cfg.train.resume, cfg.output.output_name)
            check_same_data(ckpt, len(train), steps)
            pos = load_checkpoint(ckpt, peft_model, optimizer, scheduler, scaler)
            self._emit("status", message=f"resumed from {ckpt} at step {pos.step}")
        ctx = _Loop(self, peft_model, tokenizer, device, optimizer, scheduler, scaler, train, evals, steps)
        info = {"config": asdict(cfg), "targets": targets, "data": report.summary()}
        final_loss, stopped = ctx.loop(pos, info)
        eval_loss = ctx.evaluate() if evals else None
        if eval_loss is not None:
            ctx.log_scalar("eval/loss", eval_loss, pos.step)
            self._emit("status", step=pos.step, message=f"eval loss {eval_loss:.4f}")
        info.update(steps=pos.step, final_loss=final_loss, eval_loss=eval_loss, stopped=stopped)
        # A resumed run finishes the same run: its adapter replaces the stopped one (kept in .backup).
        overwrite = cfg.output.overwrite or bool(cfg.train.resume)
        adapter = save_adapter(peft_model, tokenizer, resolve_adapter_dir(out, cfg.output.output_name, overwrite), info)
        self.model, self.tokenizer = peft_model, tokenizer
        merged = self._save_merged(peft_model, tokenizer, adapter) if cfg.output.save_merged and not stopped else None
        ctx.close()
        msg = f"saved adapter {adapter}" + (f" and merged model {merged}" if merged else "")
        self._emit("stopped" if stopped else "done", step=pos.step, total_steps=steps, path=str(adapter), message=msg)
        return TextTrainResult(adapter, merged, pos.step, final_loss, eval_loss, stopped, out, report)

    def _save_merged(self, peft_model: Any, tokenizer: Any, adapter: Path) -> Path:
        merged = peft_model.merge_and_unload()
        self.model = merged

        def fill(tmp: Path) -> None:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))

        return write_folder_atomic(adapter.with_name(adapter.name + "-merged"), fill)


class _Loop:
    """The per-run state of the loop (model, optimizer, data, logging) and its steps."""

    def __init__(self, trainer: TextLoraTrainer, model: Any, tokenizer: Any, device: torch.device,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                 train: list[Sample], evals: list[Sample], steps: int) -> None:
        self.t, self.cfg = trainer, trainer.config
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.train, self.evals, self.steps = train, evals, steps
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        mp = self.cfg.train.mixed_precision
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
        out = Path(self.cfg.output.output_dir)
        self.logger = Logger(run_folder(out, "logs", self.cfg.output.output_name), self.cfg.output.tensorboard)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.logger.scalar(tag, value, step)

    def close(self) -> None:
        self.logger.close()

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batch(self, idxs: list[int], data: list[Sample]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate([data[i] for i in idxs], self.pad_id).items()}

    def step(self, group: list[list[int]]) -> float:
        """One optimizer step over a group of micro-batches; the loss is averaged per target token."""
        self.model.train()
        batches = [self._batch(idxs, self.train) for idxs in group]
        total = max(1, sum(target_tokens(b["labels"]) for b in batches))
        loss_sum = 0.0
        for b in batches:
            if target_tokens(b["labels"]) == 0:
                continue  # nothing to learn here; its mean loss would be NaN
            with self._autocast():
                loss = self.model(**b).loss * (target_tokens(b["labels"]) / total)
            self.scaler.scale(loss).backward()
            loss_sum += float(loss.detach())
        self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.cfg.optim.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per target token over the held-out samples."""
        self.model.eval()
        bs = self.cfg.train.batch_size
        loss_sum, count = 0.0, 0
        for i in range(0, len(self.evals), bs):
            b = self._batch(list(range(i, min(i + bs, len(self.evals)))), self.evals)
            n = target_tokens(b["labels"])
            if n == 0:
                continue
            with self._autocast():
                loss_sum += float(self.model(**b).loss) * n
            count += n
        return loss_sum / max(count, 1)

    def checkpoint(self, pos: Position, info: dict[str, Any]) -> Path:
        root = checkpoints_root(self.cfg.output.output_dir, self.cfg.output.output_name)
        path = save_checkpoint(root / f"step-{pos.step:07d}", self.model, self.optimizer, self.scheduler,
                               self.scaler, pos, {"data": info.get("data", ""), "train_samples": len(self.train),
                                                  "total_steps": self.steps})
        prune_checkpoints(root, self.cfg.output.keep_checkpoints)
        self.t._emit("checkpoint", step=pos.step, total_steps=self.steps, path=str(path),
                     message=f"checkpoint {path}")
        return path

    def loop(self, pos: Position, info: dict[str, Any]) -> tuple[float | None, bool]:
        """Train from ``pos`` (updated in place) to the last step; (last loss, stopped)."""
        t, cmds = self.cfg.train, self.t.commands
        started, first_step, loss = time.time(), pos.step, None
        while pos.step < self.steps:
            groups = epoch_groups(len(self.train), t.batch_size, t.gradient_accumulation_steps, t.seed, pos.epoch)
            while pos.group < len(groups) and pos.step < self.steps:
                loss = self.step(groups[pos.group])
                pos.group += 1
                pos.step += 1
                lr = self.scheduler.get_last_lr()[0]
                self.log_scalar("train/loss", loss, pos.step)
                self.log_scalar("train/lr", lr, pos.step)
                rate = (pos.step - first_step) / max(time.time() - started, 1e-9)
                self.t._emit("step", step=pos.step, total_steps=self.steps, epoch=pos.epoch + 1, loss=loss, lr=lr,
                             it_per_s=rate, eta_s=(self.steps - pos.step) / rate if rate else None)
                if t.eval_steps and self.evals and pos.step % t.eval_steps == 0 and pos.step < self.steps:
                    ev = self.evaluate()
                    self.log_scalar("eval/loss", ev, pos.step)
                    self.t._emit("status", step=pos.step, message=f"step {pos.step}: eval loss {ev:.4f}")
                if cmds.stop_requested:
                    self.checkpoint(pos, info)
                    return loss, True
                if (t.save_steps and pos.step % t.save_steps == 0) or cmds.take_save():
                    self.checkpoint(pos, info)
            if pos.group >= len(groups):
                pos.epoch, pos.group = pos.epoch + 1, 0
        return loss, False
