"""``python -m lora_trainer bench``: training speed and memory, memory estimates, caption speed."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_trainer.config import COMPILE_MODES, NETWORK_TYPE_HELP
from lora_trainer.errors import ConfigError
from lora_trainer.families import DEFAULT_FAMILY, family_names, get_family
from lora_trainer.fsutil import atomic_write_text
from lora_trainer.threads import add_threads_argument, configure_cpu_threads
from lora_trainer.train.checkpointing import describe

TINY_RES = 64  # the tiny models of every family


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lora_trainer bench",
        description="Measure LoRA training speed and memory (random weights: speed does not depend on them), "
                    "compare with a plain diffusers+peft reference loop, estimate memory, or time captioning.")
    p.add_argument("--arch", choices=family_names(), default=None, help=f"model family (default: {DEFAULT_FAMILY}, "
                   "or with --config the config's model)")
    p.add_argument("--size", choices=["tiny", "full"], default="tiny",
                   help="tiny models (CPU) or full-size SD1.5/SD2/SDXL built from the packaged configs (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default: 64 tiny, 512/768/1024 full")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None,
                   help="default: bf16 on a GPU or with --estimate, no (fp32) on a CPU")
    p.add_argument("--checkpointing", type=float, nargs="?", const=1.0, default=0.0, metavar="SHARE",
                   help="gradient checkpointing of every block of the denoiser, or of this share of them "
                        "(train.checkpointing_share, e.g. 0.5)")
    p.add_argument("--variant", default="",
                   help="with --estimate: the family's variant (Flux.1: dev, schnell; SD3.5: medium, large); "
                        "default its first")
    p.add_argument("--weight-dtype", choices=["auto", "fp8", "nf4"], default="auto",
                   help="with --estimate: storage of the transformer's weights (model.weight_dtype; Flux.1, SD3.5)")
    p.add_argument("--network", choices=tuple(NETWORK_TYPE_HELP), default="lora",
                   help="with --estimate: the adapter kind (network.type); locon also adapts the ResNet blocks")
    p.add_argument("--compile", action="store_true", help="train.compile: torch.compile the UNet in our loop")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="train.compile_mode (implies --compile): reduce-overhead records CUDA graphs")
    p.add_argument("--fp32-norms", action="store_true",
                   help="train.fp32_norms: GroupNorm / LayerNorm in fp32 under mixed precision (autocast's rule), "
                        "in our loop and the estimate")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop")
    p.add_argument("--targets", choices=["attention", "kohya"], default=None,
                   help="LoRA targets: the reference's attention projections (like for like; the default when "
                        "timing) or kohya's default set (attention, feed-forward, projections; the trainer's "
                        "default, and with --estimate)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--estimate", action="store_true",
                   help="only print the pre-flight memory estimate (full-size model, no GPU needed)")
    p.add_argument("--config", type=Path, default=None,
                   help="with --estimate: the run of this YAML config, with all its settings (resolution, batch, "
                        "precision, checkpointing, network, optimizer, caption length, caches); the family is "
                        "the config's model's unless --arch names one")
    p.add_argument("--free-gb", type=float, default=None,
                   help="with --estimate: also pick the fastest settings that fit this much free memory")
    p.add_argument("--measure-cpu", action="store_true",
                   help="with --estimate: also run one fp32 step of the full-size model on this CPU and compare "
                        "what it allocates with the prediction (about a minute for SD1.5 at 512px)")
    p.add_argument("--profile", action="store_true",
                   help="count per step what each loop dispatches (aten ops, dtype casts, memory-format "
                        "conversions) and the top ops, instead of timing; with --precision bf16 on a CPU the "
                        "weights are bf16 under autocast, as on a GPU; with --estimate: the traced step's ops "
                        "and casts under CUDA autocast's rules")
    p.add_argument("--caption", action="store_true", help="time BLIP captioning (images/s) instead")
    add_threads_argument(p)
    return p


def _compile_args(args: argparse.Namespace) -> dict[str, Any]:
    """BenchSpec's compile fields: --compile-mode alone turns compiling on."""
    return {"compile": args.compile or args.compile_mode is not None, "compile_mode": args.compile_mode or "default"}


def _config_estimate(args: argparse.Namespace) -> dict:
    """``--estimate --config``: the estimate of that run, as ``train --check`` prints it, with its parts."""
    from lora_trainer.config import load_config
    from lora_trainer.train import memory_check

    cfg = load_config(args.config)
    model = memory_check.model_of(cfg)
    arch = args.arch or (model and model[0])
    if not arch:
        raise ConfigError(f"{args.config}: the family of model.base_model {cfg.model.base_model!r} is not known "
                          "before it loads (or it is not there); name it with --arch")
    variant = args.variant or (model[1] if model and model[0] == arch else "")
    est = memory_check.run_estimate(cfg, arch, variant=variant)
    print(f"{args.config}: {memory_check.describe(est, ' '.join(filter(None, (arch, est.variant))))}")
    _print_parts(est)
    return {"estimate": est.as_dict()}


def _print_parts(est: Any) -> None:
    for key, label in (("weights_gb", "weights"), ("lora_gb", "LoRA + optimizer"), ("step_gb", "step"),
                       ("load_gb", "load"), ("text_caching_gb", "text caching"), ("caching_gb", "caching"),
                       ("total_gb", "total")):
        print(f"  {label:<16} {getattr(est, key):7.2f} GiB")


def _estimate(args: argparse.Namespace, resolution: int, precision: str) -> dict:
    from lora_trainer.bench.estimate import choose_settings, estimate_peak_memory

    prec = precision if precision != "no" else "fp32"
    est = estimate_peak_memory(args.arch, resolution, args.batch, args.rank, prec, bool(args.checkpointing),
                               targets=args.targets, variant=args.variant, weight_dtype=args.weight_dtype,
                               network=args.network, checkpointing_share=args.checkpointing or 1.0,
                               fp32_norms=args.fp32_norms)
    model = f"{args.arch} {est.variant}".strip()
    print(f"predicted peak for full-size {model} at {resolution}px, batch {args.batch}, {args.network} rank "
          f"{args.rank} ({args.targets} targets), {prec}, weights {args.weight_dtype}, "
          f"checkpointing {describe(args.checkpointing)}, norms in {'fp32' if args.fp32_norms else prec}:")
    _print_parts(est)
    out = {"estimate": est.as_dict()}
    if args.profile:
        from lora_trainer.bench.estimate import trace_step

        share = float(args.checkpointing) if args.checkpointing else 0.0
        ops = trace_step(args.arch, resolution, args.batch, args.rank, prec, share, targets=args.targets,
                         variant=est.variant, weight_dtype=args.weight_dtype, network=args.network,
                         fp32_norms=args.fp32_norms, count_ops=True)
        print(f"the traced step, CUDA autocast's rules: {ops['computing_ops']} computing ops, "
              f"{ops['casts']} dtype casts (LoRA layers as peft runs them)")
        out["traced_ops"] = {k: ops[k] for k in ("computing_ops", "casts")}
    if args.free_gb is not None:
        choice = choose_settings(args.free_gb, args.arch, resolution=resolution, rank=args.rank, precision=prec,
                                 variant=args.variant, network=args.network)
        print(f"fastest settings for {args.free_gb} GiB free: {choice}")
        out["choice"] = choice
    if args.measure_cpu:
        from lora_trainer.bench.memcheck import format_row, measure_step_memory

        m = measure_step_memory(args.arch, resolution, args.batch, args.rank, args.checkpointing, size="full",
                                network=args.network)
        print("one fp32 step on the CPU, beyond weights and optimizer state:")
        print("  " + format_row(m))
        out["cpu_step"] = m.as_dict()
    return out


def _profile(args: argparse.Namespace, resolution: int, precision: str, device: Any) -> dict:
    from lora_trainer.bench.profile import format_profiles, profile_bench
    from lora_trainer.bench.runner import BenchSpec

    spec = BenchSpec(args.arch, args.size, resolution, args.batch, args.rank, precision, args.checkpointing,
                     args.steps, args.warmup, str(device), not args.no_reference, args.targets,
                     cpu_low_precision=precision != "no", fp32_norms=args.fp32_norms, **_compile_args(args))
    rows = profile_bench(spec)
    print(f"{args.size} {args.arch}, {resolution}px, batch {args.batch}, rank {args.rank} ({args.targets} targets), "
          f"precision {precision}, checkpointing {describe(args.checkpointing)}, {device}:")
    print(format_profiles(rows))
    return {"spec": asdict(spec), "profiles": [r.as_dict() for r in rows]}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.config is not None:
        if not args.estimate:
            raise ConfigError("--config: goes with --estimate (the estimate of that run)")
        out = _config_estimate(args)
        if args.json:
            atomic_write_text(args.json, json.dumps(out, indent=2, default=str))
        return 0
    args.arch = args.arch or DEFAULT_FAMILY
    args.targets = args.targets or ("kohya" if args.estimate else "attention")
    configure_cpu_threads(args.threads, small_model=args.size == "tiny" and not args.estimate)
    if args.caption:
        from lora_trainer.bench.caption import run_caption_bench

        rows = run_caption_bench(batch_size=8 if args.batch == 1 else args.batch, device=args.device)
        if args.json:
            atomic_write_text(args.json, json.dumps(rows, indent=2))
        return 0
    for name in ("batch", "rank", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: {getattr(args, name)} must be at least 1")
    full = args.estimate or args.size == "full"
    resolution = args.resolution or (get_family(args.arch).default_resolution if full else TINY_RES)
    if resolution % 8:
        raise ConfigError(f"--resolution: {resolution} must be a multiple of 8")
    from lora_trainer.bench.runner import BenchSpec, resolve_device, run_bench

    device = resolve_device(args.device)
    # An estimate is for a GPU run (bf16 unless asked otherwise), wherever it is computed.
    precision = args.precision or ("bf16" if device.type == "cuda" or args.estimate else "no")
    if args.estimate:
        out = _estimate(args, resolution, precision)
    elif args.profile:
        out = _profile(args, resolution, precision, device)
    else:
        if args.size == "full" and device.type != "cuda":
            print("note: a full-size model on a CPU is very slow; use --size tiny here")
        spec = BenchSpec(args.arch, args.size, resolution, args.batch, args.rank, precision, args.checkpointing,
                         args.steps, args.warmup, str(device), not args.no_reference, args.targets,
                         fp32_norms=args.fp32_norms, **_compile_args(args))
        from lora_trainer.bench.runner import print_table

        result = run_bench(spec)
        print_table(result)
        out = asdict(result)
        if device.type == "cuda" and args.size == "full":
            from lora_trainer.bench.estimate import estimate_peak_memory

            est = estimate_peak_memory(args.arch, resolution, args.batch, args.rank,
                                       precision if precision != "no" else "fp32", bool(args.checkpointing),
                                       targets=args.targets, checkpointing_share=args.checkpointing or 1.0,
                                       fp32_norms=args.fp32_norms)
            err = (est.total_gb - result.peak_memory_gb) / result.peak_memory_gb * 100
            print(f"memory estimate {est.total_gb:.2f} GiB vs measured {result.peak_memory_gb:.2f} GiB ({err:+.1f} %)")
            out["estimate"] = est.as_dict()
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0
