"""``train`` and ``config`` commands (``demo`` is in ``demo_run.py``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_trainer.config import example_yaml, load_config, parse_set_overrides, read_yaml, reference_markdown
from lora_trainer.errors import ConfigError
from lora_trainer.threads import configure_cpu_threads
from lora_trainer.train.events import TrainEvent
from lora_trainer.train.run_args import EXIT_CODES_HELP, add_run_arguments
from lora_trainer.train.stopping import EXIT_STOPPED


class ProgressBar:
    """Step events -> a tqdm bar (step, loss, lr, it/s, ETA); other events as lines above it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, ev: TrainEvent) -> None:
        from tqdm import tqdm

        if ev.kind == "step":
            if self.bar is None and self.enabled:
                self.bar = tqdm(total=ev.total_steps, unit="step", dynamic_ncols=True, desc="train")
            if self.bar is not None:
                self.bar.total = ev.total_steps
                self.bar.update(ev.step - self.bar.n)
                self.bar.set_postfix(loss=f"{ev.loss:.4f}" if ev.loss is not None else "-",
                                     lr=f"{ev.lr:.2e}" if ev.lr is not None else "-", refresh=False)
            elif ev.step % 10 == 0 or ev.step == ev.total_steps:
                eta = f"{ev.eta_s:.0f}s" if ev.eta_s is not None else "?"
                loss = f"{ev.loss:.4f}" if ev.loss is not None else "-"
                speed = f"{ev.it_per_s:.2f} it/s" if ev.it_per_s else "- it/s"
                print(f"step {ev.step}/{ev.total_steps} loss {loss} {speed} eta {eta}", flush=True)
        elif ev.kind in ("status", "checkpoint", "sample", "done", "stopped", "error"):
            text = ev.message or (f"{ev.kind}: {ev.path}" if ev.path else ev.kind)
            if ev.kind in ("error", "done", "stopped"):
                text = ""  # the CLI prints the result (or the error) itself, once
            if text and self.bar is not None:
                self.bar.write(text)
            elif text:
                print(text, flush=True)
        if ev.kind in ("done", "stopped", "error") and self.bar is not None:
            self.bar.close()
            self.bar = None


def _wants_llm(config_path: str | None, sets: list[str]) -> bool:
    task = read_yaml(config_path).get("task") if config_path else None
    for item in sets:
        if item.split("=", 1)[0].strip() == "task":
            task = parse_set_overrides([item]).get("task")
    return str(task).strip().lower() == "llm"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_trainer train",
                                 description="Train a LoRA from a YAML config (see 'config --example').",
                                 epilog=EXIT_CODES_HELP)
    add_run_arguments(ap, "YAML config file", dest="sets")
    ap.add_argument("--check", action="store_true",
                    help="check the config and the dataset (no model is loaded), print the report, do not train")
    known, _ = ap.parse_known_args(argv)  # the llm command has options of its own
    if _wants_llm(known.config, known.sets):
        from lora_trainer.llm.cli import train_main

        return int(train_main(argv) or 0)
    args = ap.parse_args(argv)
    if args.config is None and not args.sets:
        raise ConfigError("train: give --config my.yaml (see 'python -m lora_trainer config --example')")
    cfg = load_config(args.config, args.sets)
    if args.check:
        return check_config(cfg, args.config or "--set")
    configure_cpu_threads(args.threads, small_model=cfg.model.base_model == "demo")
    return run_training(cfg, progress=not args.no_progress)


def run_training(cfg: Any, progress: bool = True) -> int:
    from lora_trainer.hosts.standalone import StandaloneHost  # the CLI is an entry point: it picks the host
    from lora_trainer.train.trainer import Trainer

    bar = ProgressBar(enabled=progress and sys.stderr.isatty())
    result = Trainer(cfg, StandaloneHost(), callbacks=[bar]).run()
    word = "stopped early; resume with --set resume=latest" if result.stopped else "done"
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print(f"{word}: {result.steps} steps{loss}")
    print(f"LoRA: {result.lora_path}")
    print(f"outputs: {result.output_dir}")
    return EXIT_STOPPED if result.stopped else 0


def config_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_trainer config",
                                 description="Print an example config, the reference, or check a config.")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--example", action="store_true", help="print a commented example YAML")
    g.add_argument("--reference", action="store_true", help="print the config reference (Markdown)")
    g.add_argument("--check", metavar="FILE", help="validate a config file (with --set overrides)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    if args.example:
        sys.stdout.write(example_yaml())
    elif args.reference:
        sys.stdout.write(reference_markdown())
    else:
        if _wants_llm(args.check, args.sets):
            from lora_trainer.llm.config import load_llm_config

            llm = load_llm_config(args.check, args.sets)
            print(f"{args.check}: OK (text LoRA, base model {llm.model.base_model!r})")
            return 0
        return check_config(load_config(args.check, args.sets), args.check)
    return 0


def check_config(cfg: Any, label: str) -> int:
    """Every check that needs no model (names, folders, files, the dataset scan); each problem
    on its own line. Exit code 0 when the run can start, 2 otherwise."""
    from lora_trainer.data.scan import scan_dataset
    from lora_trainer.errors import DatasetError, LoraTrainerError
    from lora_trainer.train.preflight import find_problems

    problems = find_problems(cfg)
    report = None
    if not any(isinstance(p, DatasetError) for p in problems):
        try:
            report = scan_dataset(cfg.data)
        except LoraTrainerError as e:
            problems.append(e)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems or report is None:
        return 2
    print(report.summary())
    print(f"{label}: OK (base model {cfg.model.base_model!r}, data {cfg.data.train_data_dir!r}, "
          f"rank {cfg.network.rank}, output {Path(cfg.output.output_dir) / cfg.output.output_name})")
    for line in memory_lines(cfg):
        print(line)
    return 0


def memory_lines(cfg: Any) -> list[str]:
    """What the run of ``cfg`` is estimated to need on a GPU, and on this machine's GPU whether that
    is there; nothing for the demo model or a model whose family cannot be told without loading it."""
    import torch

    from lora_trainer.train import memory_check

    model = memory_check.model_of(cfg)
    if model is None:
        return []
    est = memory_check.run_estimate(cfg, model[0], variant=model[1])
    lines = [memory_check.describe(est, " ".join(filter(None, model)))]
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        available = memory_check.available_gb(device, [])
        warning = memory_check.memory_warning(cfg, est, available, str(device))
        lines.append(warning or f"memory: {available:.1f} GiB free on {device}: enough for this run")
    return lines
