"""The options and exit codes every training command shares (the image ``train`` and the text one)."""

from __future__ import annotations

import argparse

from lora_trainer.threads import add_threads_argument
from lora_trainer.train.stopping import EXIT_STOPPED

EXIT_CODES_HELP = (f"exit codes: 0 finished; 2 bad input (one line says what and where); {EXIT_STOPPED} stopped "
                   "early by Ctrl-C or SIGTERM (the LoRA and a checkpoint are saved: resume with --set "
                   "resume=latest); 1 any other failure")


def add_run_arguments(ap: argparse.ArgumentParser, config_help: str, dest: str) -> None:
    """--config, --set (repeatable, into ``dest``) and --no-progress: the train commands' common options."""
    ap.add_argument("--config", "-c", help=config_help)
    ap.add_argument("--set", dest=dest, action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set network.rank=16 (repeatable)")
    ap.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    add_threads_argument(ap)
