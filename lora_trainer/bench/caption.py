"""Captioning speed: images/s of BLIP at a given batch size, with random weights.

Speed does not depend on the weights' values, so the models are built from ``BlipConfig``
(defaults = BLIP-base: ViT-B/16 at 384², BERT-base decoder) and run offline. Generation is pinned
to a fixed number of new tokens (min = max length) so every run does the same work; a real model
stops earlier on short captions and is a little faster.
"""

from __future__ import annotations

import time
from typing import Any

SIZES = ("tiny", "base", "large")


def blip_config(size: str) -> Any:
    from transformers import BlipConfig

    if size == "base":
        return BlipConfig()
    if size == "large":  # BLIP-large: ViT-L/16 vision tower, same text decoder
        return BlipConfig(vision_config={"hidden_size": 1024, "intermediate_size": 4096,
                                         "num_hidden_layers": 24, "num_attention_heads": 16},
                          text_config={"encoder_hidden_size": 1024})
    if size == "tiny":
        return BlipConfig(
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
            text_config={"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "encoder_hidden_size": 32, "bos_token_id": 998,
                         "sep_token_id": 102, "eos_token_id": 2, "pad_token_id": 0},
            projection_dim=32)
    raise ValueError(f"BLIP size {size!r}: expected one of {', '.join(SIZES)}")


def _images(n: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(n)]


def bench_blip(size: str = "base", batch_size: int = 8, steps: int = 2, warmup: int = 1, device: str = "auto",
               num_beams: int = 3, new_tokens: int = 20, fp16: bool = True, seed: int = 0,
               threads: int | None = None) -> dict[str, Any]:
    """Time ``steps`` batches (after ``warmup``) of preprocessing + generation; return one table row.

    ``threads`` sets torch's CPU threads: on a busy machine one thread avoids the spin-waiting
    that makes small multi-threaded kernels many times slower.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import BlipForConditionalGeneration, BlipImageProcessor

    from lora_trainer.caption.blip import resolve_device

    device = resolve_device(device)
    dtype = torch.float16 if fp16 and device.startswith("cuda") else torch.float32
    cfg = blip_config(size)
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(cfg).to(device=device, dtype=dtype).eval()
    size_px = cfg.vision_config.image_size
    processor = BlipImageProcessor(size={"height": size_px, "width": size_px})
    images = _images(batch_size, seed)
    length = new_tokens + 1  # + the start token
    kw = {"num_beams": num_beams, "min_length": length, "max_length": length, "do_sample": False}

    def one_batch() -> None:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
        with torch.inference_mode():
            model.generate(pixel_values=pixels, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(warmup):
        one_batch()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        one_batch()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {"model": f"blip-{size}", "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "device": device if not device.startswith("cuda") else torch.cuda.get_device_name(),
            "dtype": str(dtype).replace("torch.", ""), "batch": batch_size, "beams": num_beams,
            "threads": torch.get_num_threads(), "tokens": new_tokens, "s_per_batch": seconds, "images_per_s": batch_size / seconds, "peak_gib": peak}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'model':<11} {'params':>7} {'device':<24} {'threads':>7} {'dtype':<8} {'batch':>5} {'beams':>5} " \
           f"{'tokens':>6} {'s/batch':>8} {'images/s':>9} {'peak GiB':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"{r['model']:<11} {r['params_m']:>6.1f}M {r['device'][:24]:<24} {r['threads']:>7} {r['dtype']:<8} "
                     f"{r['batch']:>5} {r['beams']:>5} {r['tokens']:>6} {r['s_per_batch']:>8.3f} "
                     f"{r['images_per_s']:>9.2f} {peak:>8}")
    return "\n".join(lines)


def run_caption_bench(sizes: tuple[str, ...] = ("tiny", "base"), batch_size: int = 8, steps: int = 2,
                      warmup: int = 1, device: str = "auto", num_beams: int = 3, new_tokens: int = 20,
                      fp16: bool = True, threads: int | None = None, print_fn: Any = print) -> list[dict[str, Any]]:
    """Benchmark BLIP captioning for each size, print a table, return the rows."""
    rows = []
    for size in sizes:
        rows.append(bench_blip(size, batch_size, steps, warmup, device, num_beams, new_tokens, fp16, threads=threads))
    print_fn(format_table(rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lora_trainer.bench.caption",
                                description="BLIP captioning speed with random weights (images/s)")
    p.add_argument("--sizes", default="tiny,base", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--beams", type=int, default=3)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--no-fp16", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args(argv)
    run_caption_bench(tuple(s.strip() for s in a.sizes.split(",") if s.strip()), a.batch_size, a.steps,
                      a.warmup, a.device, a.beams, a.tokens, not a.no_fp16, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
