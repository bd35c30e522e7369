"""Check the memory estimator against a real training step, measured on the CPU.

The estimator predicts what a step allocates beyond the resident weights and optimizer state:
saved activations and the model output and loss buffers, or the LoRA gradients and the
optimizer's temporaries, whichever is larger. Here the same step
really runs, in fp32, in a fresh process whose large allocations each get their own pages
(``MALLOC_MMAP_THRESHOLD_``), so the rise of the process's peak resident memory during the
step is what the step allocated. On a GPU, ``bench --size full`` compares the whole estimate
with ``torch.cuda.max_memory_allocated`` instead.

    python -m lora_trainer.bench.memcheck --arch sd1 --resolution 512 [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from lora_trainer.config import NETWORK_TYPE_HELP
from lora_trainer.families import DEFAULT_FAMILY, family_names, get_family

GiB = 1024**3
# Allocations of 64 KiB and more come straight from mmap and go back to the system when freed.
MMAP_THRESHOLD = "65536"


@dataclass
class StepMemory:
    arch: str
    size: str
    resolution: int
    batch_size: int
    rank: int
    gradient_checkpointing: float  # the share of the denoiser's blocks checkpointed (0: off)
    measured_gb: float  # what one step allocated beyond weights and optimizer state
    predicted_gb: float  # the estimator's step_gb (what a step adds)
    phase: str = "step"  # or "caching": the VAE encoding one image (what it allocates; encode_gb)
    network: str = "lora"  # the adapter kind (network.type)
    stored: str = ""  # the frozen weights stored in this dtype and cast to fp32 per call (Forge's manual cast)

    @property
    def error(self) -> float:
        """(predicted - measured) / measured."""
        return (self.predicted_gb - self.measured_gb) / self.measured_gb

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error": self.error}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_rise(run: Any) -> int:
    """How far the process's peak resident size rises above the current one while ``run()`` runs."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")  # reset the peak resident size to the current one
    base = _status_bytes("VmRSS")
    run()
    return _status_bytes("VmHWM") - base


def _caching_in_this_process(arch: str, size: str, resolution: int) -> dict[str, int]:
    import torch
    from diffusers import AutoencoderKL

    from lora_trainer.bench.estimate import vae_config

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(vae_config(arch, size)).requires_grad_(False)
    pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1

    @torch.no_grad()
    def encode() -> None:
        vae.encode(pixels).latent_dist.sample()

    encode()  # first-call allocations (thread pools, kernels) are not the cache's
    return {"step_bytes": _peak_rise(encode)}


def _unet_forward(arch: str, size: str, resolution: int, batch: int, rank: int, network: str = "lora",
                  stored: str = "", share: float = 0.0, network_args: Any = (),
                  token_chunks: int = 1) -> tuple[Any, Any, list[Any]]:
    """(UNet with the adapters, forward(), the trained text encoders whose adapters train too)."""
    import torch

    from lora_trainer.bench.adapters import text_conditioning, trained_text_encoders
    from lora_trainer.bench.estimate import _DTYPES, build_lora_unet, meta_inputs, store_cast_per_call

    text = trained_text_encoders(arch, size, torch.float32, network_args, device="cpu")
    unet, _ = build_lora_unet(arch, rank, torch.float32, size, device="cpu", network=network,
                              network_args=network_args, text_encoders=text)  # as traced
    if stored:
        store_cast_per_call(unet, _DTYPES[stored], True, share)  # as the trainer runs it
    meta = meta_inputs(unet, resolution, batch, torch.float32, token_chunks)

    def real(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: real(v) for k, v in x.items()}
        return torch.zeros(x.shape, dtype=x.dtype) if x.dtype == torch.long else torch.randn(x.shape)

    inputs = real(meta)

    def forward() -> Any:
        if not text:
            return unet(**inputs).sample
        # the trained text encoders run in the step, as the trainer runs them
        return unet(**{**inputs, "encoder_hidden_states": text_conditioning(text, batch, token_chunks, "cpu")}).sample

    return unet, forward, [te for _, te in text]


def _transformer_forward(arch: str, size: str, resolution: int, batch: int, rank: int,
                         network: str) -> tuple[Any, Any, list[Any]]:
    import torch

    from lora_trainer.bench.transformer_step import build_lora_transformer, step_call

    variant = get_family(arch).default_variant()
    model, _ = build_lora_transformer(arch, variant, rank, torch.float32, size, device="cpu", network=network)
    return model, step_call(model, arch, variant, resolution, batch, torch.float32, device="cpu"), []


def _step_in_this_process(arch: str, size: str, resolution: int, batch: int, rank: int,
                          checkpointing: float, phase: str = "step", network: str = "lora",
                          stored: str = "", network_args: Any = (), token_chunks: int = 1) -> dict[str, int]:
    import torch

    from lora_trainer.train import checkpointing as ckpt

    if phase == "caching":
        return _caching_in_this_process(arch, size, resolution)

    torch.manual_seed(0)
    if get_family(arch).transformer_denoiser:
        unet, forward, text = _transformer_forward(arch, size, resolution, batch, rank, network)
    else:
        unet, forward, text = _unet_forward(arch, size, resolution, batch, rank, network, stored, share=checkpointing,
                                      network_args=_pairs(network_args), token_chunks=token_chunks)
    params = [p for m in (unet, *text) for p in m.parameters() if p.requires_grad]
    if checkpointing:
        ckpt.checkpoint(unet, checkpointing)  # as the trainer does
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        pred = forward()
        loss = torch.nn.functional.mse_loss(pred.float(), torch.randn_like(pred, dtype=torch.float32))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer state now exists, as it does in every later step
    return {"step_bytes": _peak_rise(step)}


def _pairs(network_args: Any) -> tuple[tuple[str, Any], ...]:
    """``adapters.network_args`` back from JSON (lists for tuples)."""
    return tuple((f, tuple(v) if isinstance(v, list) else v) for f, v in network_args)


def measure_step_memory(arch: str = "sd1", resolution: int = 512, batch_size: int = 1, rank: int = 16,
                        gradient_checkpointing: float = 0.0, size: str = "full",
                        threads: int | None = None, phase: str = "step", network: str = "lora",
                        stored: str = "", network_args: tuple[tuple[str, Any], ...] = (),
                        token_chunks: int = 1) -> StepMemory:
    """Run one fp32 step (``phase`` "caching": the VAE encoding one image) on the CPU in a fresh
    process; compare with the estimator's prediction. ``gradient_checkpointing``: the share of
    the denoiser's blocks checkpointed (True: all, 0: none). ``stored``: the UNet's frozen weights
    stored in that dtype and cast to fp32 by each layer at every call (as Forge does).
    ``network_args`` (``adapters.network_args``), ``token_chunks``: a run's other network settings
    and its caption length, the adapters placed by the trainer's injection (a UNet family)."""
    from lora_trainer.bench.estimate import estimate_peak_memory

    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("measuring step memory needs Linux (/proc/self/clear_refs)")
    args = {"arch": arch, "size": size, "resolution": resolution, "batch": batch_size, "rank": rank,
            "checkpointing": float(gradient_checkpointing), "phase": phase, "network": network, "stored": stored,
            "network_args": network_args, "token_chunks": token_chunks}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "lora_trainer.bench.memcheck", "--child", json.dumps(args)],
                          env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"the measuring process failed: {tail[0]}")
    got = json.loads(lines[-1])
    est = estimate_peak_memory(arch, resolution, batch_size, rank, "fp32", bool(gradient_checkpointing), size=size,
                               device="cpu", network=network, weights_cast=(stored, "fp32") if stored else None,
                               checkpointing_share=float(gradient_checkpointing), network_args=network_args,
                               token_chunks=token_chunks)
    return StepMemory(arch, size, resolution, batch_size, rank, gradient_checkpointing, got["step_bytes"] / GiB,
                      est.encode_gb if phase == "caching" else est.step_gb, phase, network, stored)


def format_row(m: StepMemory) -> str:
    from lora_trainer.train.checkpointing import describe

    ckpt = f"{describe(m.gradient_checkpointing):<3}"
    what = ("VAE encode, 1 image       " if m.phase == "caching"
            else f"{m.network:<5} batch {m.batch_size}  rank {m.rank:<3} checkpointing {ckpt}"
            + (f"  stored {m.stored}, cast per call" if m.stored else ""))
    return (f"{m.size:>4} {m.arch:<4} {m.resolution:>5}px  {what}"
            f"  measured {m.measured_gb:7.3f} GiB  predicted {m.predicted_gb:7.3f} GiB  ({m.error:+.1%})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_trainer.bench.memcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=family_names(), default=DEFAULT_FAMILY)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", type=float, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                   help="gradient checkpointing of all the denoiser's blocks, or of this share of them")
    p.add_argument("--stored", choices=["", "bf16", "fp16"], default="",
                   help="the UNet's frozen weights stored in this dtype and cast to fp32 per call (Forge's manual cast)")
    p.add_argument("--phase", choices=["step", "caching"], default="step",
                   help="a training step, or the latent caching (the VAE encoding one image)")
    p.add_argument("--network", choices=tuple(NETWORK_TYPE_HELP), default="lora", help="the adapter kind (network.type)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_step_in_this_process(**json.loads(args.child))), flush=True)
        return 0
    m = measure_step_memory(args.arch, args.resolution, args.batch, args.rank, args.checkpointing, args.size,
                            phase=args.phase, network=args.network, stored=args.stored)
    print(format_row(m))
    if args.json:
        from pathlib import Path

        from lora_trainer.fsutil import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(m.as_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
