"""Command line of text LoRA.

``python -m lora_trainer train --config llm.yaml`` hands a ``task: llm`` config to
:func:`train_main`; ``python -m lora_trainer generate`` is :func:`generate_main`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lora_trainer.threads import configure_cpu_threads
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.run_args import EXIT_CODES_HELP, add_run_arguments
from lora_trainer.train.stopping import EXIT_STOPPED, stop_on_signals


class _Progress:
    """tqdm bar over optimizer steps (plain lines every 10 steps when off); other events above it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, ev: TrainEvent) -> None:
        from tqdm import tqdm

        if ev.kind == "step" and not self.enabled:
            if ev.step % 10 == 0 or ev.step == ev.total_steps:
                print(f"step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} lr {ev.lr:.2e}", flush=True)
        elif ev.kind == "step":
            if self.bar is None:
                self.bar = tqdm(total=ev.total_steps, initial=ev.step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(ev.step - self.bar.n)
            self.bar.set_postfix(loss=f"{ev.loss:.4f}", lr=f"{ev.lr:.2e}", epoch=ev.epoch)
        elif ev.message and ev.kind != "error":  # the CLI prints the error itself, once
            (self.bar.write if self.bar is not None else print)(ev.message)
        if ev.kind in ("done", "stopped", "error") and self.bar is not None:
            self.bar.close()


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_trainer train",
                                description="Train a text LoRA for a causal language model (task: llm).",
                                epilog=EXIT_CODES_HELP)
    add_run_arguments(p, "YAML file with 'task: llm' (see docs/text-lora.md)", dest="overrides")
    p.add_argument("--check", action="store_true", help="check the config and data, print the report, do not train")
    return p


def train_main(argv: list[str]) -> int:
    from lora_trainer.llm.config import load_llm_config
    from lora_trainer.llm.train import TextLoraTrainer

    args = train_parser().parse_args(argv)
    cfg = load_llm_config(args.config, args.overrides)
    if args.check:
        from lora_trainer.llm.data import build_datasets
        from lora_trainer.llm.model import check_model_folder, load_tokenizer

        tok = load_tokenizer(check_model_folder(cfg.model.base_model))
        print(build_datasets(cfg.data, tok, cfg.train.seed)[2].summary())
        return 0
    configure_cpu_threads(args.threads)
    trainer = TextLoraTrainer(cfg, callbacks=[_Progress(enabled=not args.no_progress and sys.stderr.isatty())])
    # Ctrl-C or SIGTERM: stop after this step (checkpoint and adapter saved); again: abort.
    with stop_on_signals(trainer.stop, lambda: trainer.commands.stop_requested):
        thread = trainer.start()
        while thread.is_alive():
            thread.join(0.2)
    if trainer.error is not None:
        raise trainer.error
    result = trainer.result
    assert result is not None
    print(f"adapter: {result.adapter_path}")
    if result.merged_path:
        print(f"merged model: {result.merged_path}")
    if result.stopped:
        print(f"stopped at step {result.steps}; continue with --set train.resume=latest")
        return EXIT_STOPPED
    return 0


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_trainer generate",
                                description="Generate text with a language model and, optionally, a text LoRA.")
    p.add_argument("--model", help="base model folder (default: the one the adapter was trained on)")
    p.add_argument("--adapter", help="adapter folder written by training (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--prompt", required=True, help="the prompt (a user message with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true",
                   help="format the prompt as a chat turn (chat template, or the '### User:' format training used)")
    p.add_argument("--system", default="", help="system message with --chat")
    p.add_argument("--device", default="auto")
    return p


def generate_main(argv: list[str]) -> int:
    from lora_trainer.llm.generate import generate, load_for_generation

    args = generate_parser().parse_args(argv)
    model, tokenizer = load_for_generation(args.model, args.adapter, args.device)
    print(generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, seed=args.seed, chat=args.chat, system=args.system))
    return 0
