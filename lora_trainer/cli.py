"""``python -m lora_trainer <command>``.

Each command lives in its own module and is imported only when it runs, so ``--help`` is fast
and an optional dependency (gradio, open_clip, ...) is needed only by the command that uses it.
Every command function takes ``argv`` and returns an exit code. A :class:`LoraTrainerError`
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

from lora_trainer.errors import LoraTrainerError

# command -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("lora_trainer.train.cli:main", "train a LoRA from a YAML config (image or text)"),
    "config": ("lora_trainer.train.cli:config_main", "print an example config or check one"),
    "demo": ("lora_trainer.train.demo_run:demo_main", "train on the embedded demo model and dataset"),
    "prepare": ("lora_trainer.data.cli:prepare_main", "validate a dataset folder and show its buckets"),
    "caption": ("lora_trainer.caption.cli:main", "caption images with BLIP and/or CLIP; tag tools"),
    "inspect": ("lora_trainer.lora.cli:inspect_main", "show what a LoRA file holds and which loaders read it"),
    "app": ("lora_trainer.ui.app:main", "open the Train LoRA tab in a standalone app"),
    "bench": ("lora_trainer.bench.cli:main", "measure training speed and memory"),
    "generate": ("lora_trainer.llm.cli:generate_main", "generate text with a language model and a text LoRA"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: python -m lora_trainer <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'python -m lora_trainer <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lora_trainer import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from lora_trainer.threads import prepare_openmp

    prepare_openmp()  # before any command imports torch
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except LoraTrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
