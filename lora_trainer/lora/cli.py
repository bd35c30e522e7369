"""``python -m lora_trainer inspect FILE [--json]``."""

from __future__ import annotations

import argparse

from lora_trainer.lora.files import read_lora_file
from lora_trainer.lora.report import analyse, format_report, to_json


def inspect_main(argv: list[str]) -> int:
    """Print what a LoRA file holds and a verdict per loader; exit 1 when a loader has a problem."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_trainer inspect",
        description="Show a LoRA file's architecture, ranks/alphas, targets, metadata and which "
                    "loaders (A1111, Forge, ComfyUI, diffusers) read every key at the trained strength.")
    parser.add_argument("file", help="LoRA .safetensors file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    tensors, metadata = read_lora_file(args.file)
    report = analyse(tensors, metadata)
    print(to_json(report) if args.json else format_report(args.file, report))
    return 0 if all(v["ok"] for v in report["verdicts"].values()) else 1
