"""``python -m lora_trainer prepare``: validate a dataset folder and show its buckets."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lora_trainer.config import build_config, load_config
from lora_trainer.data.scan import DatasetReport, build_report, check_report
from lora_trainer.errors import DatasetError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_trainer prepare",
        description="Check a training folder before training: unreadable, too small, uncaptioned and "
                    "duplicate images, captions without images, and the aspect buckets images fall into. "
                    "Only reads the folder.")
    p.add_argument("--input", "-i", metavar="DIR", help="training image folder (data.train_data_dir)")
    p.add_argument("--metadata", metavar="CSV", help="caption file 'filename,prompt' (data.metadata_path)")
    p.add_argument("--reg", metavar="DIR", help="regularization image folder (data.reg_data_dir)")
    p.add_argument("--resolution", type=int, help="training resolution (data.resolution, default 512)")
    p.add_argument("--on-invalid", choices=("skip", "stop"), help="data.on_invalid: exit 2 on any problem with 'stop'")
    p.add_argument("--config", "-c", metavar="YAML", help="training config to take the data settings from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.bucket_no_upscale=true (repeatable)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def _report_or_error(args: argparse.Namespace) -> tuple[DatasetReport | None, DatasetError | None]:
    cfg = load_config(args.config, args.set)
    values: dict[str, Any] = {}
    for key, value in (("data.train_data_dir", args.input), ("data.metadata_path", args.metadata),
                       ("data.reg_data_dir", args.reg), ("data.resolution", args.resolution),
                       ("data.on_invalid", args.on_invalid)):
        if value is not None:
            values[key] = value
    cfg = build_config(values, base=cfg) if values else cfg
    report = None
    try:
        report = build_report(cfg.data)
        check_report(report)
    except DatasetError as e:
        return report, e
    return report, None


def prepare_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.input is None and args.config is None and not any(s.split("=", 1)[0].strip().endswith("train_data_dir")
                                                                 for s in args.set):
        raise DatasetError("prepare: give the image folder with --input DIR (or a --config that sets data.train_data_dir)")
    report, error = _report_or_error(args)
    if args.json:
        out: dict[str, Any] = report.to_dict() if report is not None else {}
        out["trainable"] = error is None
        out["error"] = str(error) if error else None
        print(json.dumps(out, indent=2, ensure_ascii=False))
    elif report is not None:
        print(report.summary())
        print("ready to train" if error is None else "not ready to train", file=sys.stdout)
    if error is not None:
        raise error  # the command dispatcher prints it on one line and exits 2
    return 0
