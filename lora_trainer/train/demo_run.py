"""``python -m lora_trainer demo``: a LoRA that visibly teaches the demo model something, in about a minute.

The demo model (``models/demo_base.py``) draws shapes in eight colours and has never seen pink;
the demo dataset shows shapes on pink backgrounds. The run prints how the loss fell, saves a
sample every few steps (the background turns pink) and ends with a weight sweep: the same seed at
LoRA weight 0 (the base model) and 1, side by side.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from lora_trainer.train.events import TrainEvent

DEMO_PROMPT = "a yellow star on a pink background"
SWEEP_WEIGHTS = (0.0, 1.0)
SWEEP_SEED = 7
LOSS_WINDOW = 10  # steps averaged at each end of the run for the "loss A -> B" line


def demo_config(folder: Path, steps: int, device: str) -> Any:
    from lora_trainer.config import build_config

    return build_config({
        "model.base_model": "demo", "model.device": device,
        "data.train_data_dir": str(folder / "data"), "data.resolution": 64, "data.enable_buckets": False,
        "data.min_image_size": 32, "network.rank": 4, "network.alpha": 4.0, "train.batch_size": 4,
        "optim.learning_rate": 3e-3, "optim.lr_scheduler": "constant", "train.max_train_steps": steps,
        "train.save_steps": 0, "output.output_dir": str(folder / "output"),
        "output.output_name": "demo_lora", "sample.prompt": DEMO_PROMPT,
        # no classifier-free guidance: on a model this small it pushes colours past the ones it learned
        "sample.every_n_steps": max(1, steps // 4), "sample.steps": 20, "sample.guidance_scale": 1.0,
    })


class LossLog:
    """A callback that keeps every step's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def __call__(self, ev: TrainEvent) -> None:
        if ev.kind == "step" and ev.loss is not None:
            self.losses.append(float(ev.loss))

    def ends(self, k: int = LOSS_WINDOW) -> tuple[float, float] | None:
        """Mean loss of the first and of the last ``k`` steps (fewer when the run is short)."""
        if len(self.losses) < 2:
            return None
        k = max(1, min(k, len(self.losses) // 2))
        return sum(self.losses[:k]) / k, sum(self.losses[-k:]) / k


def sweep_image(images: list[Any], weights: list[float] | tuple[float, ...], scale: int = 3) -> Any:
    """The renders side by side, enlarged, each labelled with its weight."""
    from PIL import Image, ImageDraw

    w, h = images[0].size
    label = 14
    sheet = Image.new("RGB", (len(images) * w * scale, h * scale + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, weight) in enumerate(zip(images, weights, strict=True)):
        sheet.paste(img.resize((w * scale, h * scale), Image.Resampling.NEAREST), (i * w * scale, label))
        draw.text((i * w * scale + 4, 1), f"LoRA weight {weight:g}", fill="black")
    return sheet


def render_sweep(host: Any, cfg: Any, lora_name: str) -> tuple[list[Any], Path]:
    """Weight 0 and 1 of the trained LoRA from one seed, through the host's test render (as the app's
    Test section does); the sheet is written to ``<output_dir>/weight_sweep.png``."""
    from lora_trainer.fsutil import atomic_write_bytes

    res = cfg.data.resolution
    images = host.render(cfg.sample.prompt, "", SWEEP_SEED, lora_name, list(SWEEP_WEIGHTS), cfg.sample.steps,
                         res, res, cfg.sample.guidance_scale)
    buf = io.BytesIO()
    sweep_image(images, SWEEP_WEIGHTS).save(buf, format="PNG")
    path = Path(cfg.output.output_dir) / "weight_sweep.png"
    atomic_write_bytes(path, buf.getvalue())
    return images, path


def demo_main(argv: list[str]) -> int:
    from lora_trainer.threads import add_threads_argument, configure_cpu_threads
    from lora_trainer.train.cli import ProgressBar
    from lora_trainer.train.run_args import EXIT_CODES_HELP
    from lora_trainer.train.stopping import EXIT_STOPPED

    ap = argparse.ArgumentParser(prog="python -m lora_trainer demo",
                                 description="Train a LoRA on the tiny embedded model and a drawn dataset (CPU, ~1 min).",
                                 epilog=EXIT_CODES_HELP)
    ap.add_argument("--dir", default="lora_demo", help="folder for the dataset and outputs (default ./lora_demo)")
    ap.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    ap.add_argument("--device", default="cpu", help="'cpu' (default), 'cuda', 'auto'")
    ap.add_argument("--no-progress", action="store_true")
    add_threads_argument(ap)
    args = ap.parse_args(argv)
    import sys

    from lora_trainer.data.demo import LESSON_COLOUR, make_demo_dataset
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.train.outputs import run_folder
    from lora_trainer.train.trainer import Trainer

    configure_cpu_threads(args.threads, small_model=True)
    folder = Path(args.dir)
    data = make_demo_dataset(folder / "data")
    print(f"demo dataset: {data} (shapes on {LESSON_COLOUR} backgrounds; the demo model has never seen "
          f"{LESSON_COLOUR}: the LoRA teaches it)")
    cfg = demo_config(folder, args.steps, args.device)
    host, losses = StandaloneHost(), LossLog()
    result = Trainer(cfg, host, callbacks=[ProgressBar(enabled=not args.no_progress and sys.stderr.isatty()),
                                           losses]).run()
    print(f"{'stopped early' if result.stopped else 'done'}: {result.steps} steps; LoRA: {result.lora_path}")
    ends = losses.ends()
    if ends is not None:
        k = max(1, min(LOSS_WINDOW, len(losses.losses) // 2))
        print(f"loss {ends[0]:.3f} -> {ends[1]:.3f} (mean of the first and last {k} steps)")
    if result.lora_path is not None:
        samples = run_folder(Path(cfg.output.output_dir), "samples", result.lora_path.stem)
        print(f"samples of '{cfg.sample.prompt}' as it learned: {samples}")
        _, sweep = render_sweep(host, cfg, result.lora_path.stem)
        print(f"weight sweep saved to {sweep} (LoRA weight {SWEEP_WEIGHTS[0]:g}: the base model; "
              f"{SWEEP_WEIGHTS[1]:g}: with the LoRA)")
    return EXIT_STOPPED if result.stopped else 0
