"""What a run leaves in output_dir besides checkpoints: the LoRA, config, logs, samples, summary."""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from lora_trainer.fsutil import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


def run_config_copies(output_dir: Path, text: str) -> list[Path]:
    """The runs' own configs in ``output_dir`` (``logs/<lora name>/config.yaml``) whose text is
    ``text``: the output folder's config.yaml is an earlier run's when one of them matches it."""
    return [p for p in (output_dir / "logs").glob("*/config.yaml")
            if p.read_text(encoding="utf-8", errors="replace") == text]


def dataset_stats(items: list[Any]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(tag_frequency, dataset_dirs) as kohya writes them: per folder, tag counts and images/repeats."""
    tags: dict[str, Counter[str]] = {}
    dirs: dict[str, dict[str, int]] = {}
    for it in items:
        folder = str(Path(it.rel).parent) if Path(it.rel).parent != Path(".") else Path(it.path).parent.name
        if it.is_reg:
            folder = f"reg/{folder}"
        counter = tags.setdefault(folder, Counter())
        counter.update(t.strip() for t in it.caption.split(",") if t.strip())
        d = dirs.setdefault(folder, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
    return {k: dict(v) for k, v in tags.items()}, dirs


def run_folder(output_dir: Path, kind: str, stem: str) -> Path:
    """``<output_dir>/<kind>/<lora name>``: a run's logs, samples or checkpoints, kept apart from
    other runs' in the same output folder (TensorBoard shows each folder as a run of its own)."""
    return output_dir / kind / stem


class Logger:
    """Training scalars and sample images in ``folder`` (a run's ``logs/<lora name>``):
    TensorBoard's event files, or ``metrics.csv`` (rows of step, name, value) where tensorboard is
    not installed, as in the A1111 WebUI's venv. A no-op when disabled."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer: Any = None
        self.csv: Path | None = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # a dependency, but the A1111 WebUI's venv lacks it: expected, not a fault
            self.csv = folder / "metrics.csv"
            log.info("tensorboard is not installed; training scalars go to %s", self.csv)
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def scalars(self, step: int, **values: float | None) -> None:
        """``train/<name>`` for each value that is not None."""
        for k, v in values.items():
            if v is not None:
                self.scalar(f"train/{k}", v, step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        elif self.csv is not None:
            # An append-only log, like TensorBoard's own files; a resumed run adds to it.
            new = not self.csv.is_file()
            self.csv.parent.mkdir(parents=True, exist_ok=True)
            with open(self.csv, "a", encoding="utf-8", newline="") as fh:
                fh.write(("step,name,value\n" if new else "") + f"{step},{tag},{value:.6g}\n")

    def image(self, step: int, img: Image.Image, n: int = 0) -> None:
        """The sample of the run's ``n``-th prompt (counted from 0) at ``step``."""
        if self.writer is not None:
            import numpy as np

            tag = f"sample_{n + 1}" if n else "sample"
            self.writer.add_image(tag, np.asarray(img.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def save_sample(folder: Path, step: int, img: Image.Image, n: int = 0) -> Path:
    """``folder/step-NNNNNN.png`` for the first prompt, ``step-NNNNNN-K.png`` for the K-th
    (``folder``: the run's ``samples/<lora name>``)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    suffix = f"-{n + 1}" if n else ""
    return atomic_write_bytes(folder / f"step-{step:06d}{suffix}.png", buf.getvalue())


def write_summary(folder: Path, **fields: Any) -> Path:
    fields.setdefault("written_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return atomic_write_text(folder / "summary.json", json.dumps(fields, indent=2, default=str) + "\n")
