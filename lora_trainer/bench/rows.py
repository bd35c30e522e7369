"""The performance table of docs/PERFORMANCE.md in one go: every row's speed (ours and the plain
diffusers+peft loop, measured in the same run), peak memory against the estimate, and one
row's profile counts. Writes ``rows.json`` and ``rows.md`` into the output folder.

    python -m lora_trainer.bench.rows --out DIR            # full size, on a GPU (bench/gpu_rows.sh)
    python -m lora_trainer.bench.rows --out DIR --size tiny  # the same rows, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lora_trainer.config import COMPILE_MODES
from lora_trainer.fsutil import atomic_write_text


@dataclass(frozen=True)
class Row:
    name: str
    arch: str
    resolution: int
    batch: int
    targets: str
    checkpointing: float  # the share of the denoiser's blocks checkpointed (True: all)
    reference: bool
    profile: bool = False
    fp32_norms: bool = False  # train.fp32_norms: the norms as autocast runs them, for a before/after


# The rows of issue #13's table (rank 16, bf16, cached latents).
ROWS = (
    Row("SD1.5 512² batch 1, attention targets", "sd1", 512, 1, "attention", False, True, profile=True),
    Row("SD1.5 512² batch 8, attention targets", "sd1", 512, 8, "attention", False, True),
    Row("SD1.5 512² batch 1, default targets, checkpointing", "sd1", 512, 1, "kohya", True, True),
    Row("SD1.5 512² batch 32, attention targets", "sd1", 512, 32, "attention", False, False),
    Row("SDXL 1024² batch 1, default targets, checkpointing", "sdxl", 1024, 1, "kohya", True, True),
    # what the auto preset picks for SDXL on a 14 GB card (train.checkpointing_share 0.25)
    Row("SDXL 1024² batch 1, default targets, checkpointing 25 % of blocks", "sdxl", 1024, 1, "kohya", 0.25, False),
    # the second row with the norms in fp32, as autocast runs them (train.fp32_norms)
    Row("SD1.5 512² batch 8, attention targets, norms in fp32", "sd1", 512, 8, "attention", False, False,
        fp32_norms=True),
)


def _spec(row: Row, size: str, steps: int, warmup: int, device: str, compile_mode: str | None,
          resolution: int | None = None) -> Any:
    from lora_trainer.bench.runner import BenchSpec

    resolution = resolution or (row.resolution if size == "full" else 64)
    precision = "bf16" if device == "cuda" else "no"
    return BenchSpec(row.arch, size, resolution, row.batch, 16, precision, row.checkpointing, steps, warmup,
                     device, row.reference, row.targets, compile=bool(compile_mode),
                     compile_mode=compile_mode or "default", fp32_norms=row.fp32_norms)


def run_row(row: Row, size: str, steps: int, warmup: int, device: str, compile_mode: str | None = None,
            resolution: int | None = None) -> dict[str, Any]:
    """One row; ``compile_mode`` (train.compile_mode) compiles our loop's UNet, None leaves it eager."""
    from lora_trainer.bench.estimate import estimate_peak_memory
    from lora_trainer.bench.runner import run_bench

    spec = _spec(row, size, steps, warmup, device, compile_mode, resolution)
    started = time.perf_counter()
    result = run_bench(spec)
    out: dict[str, Any] = {"row": asdict(row), "result": json.loads(result.to_json())}
    if device == "cuda" and size == "full":
        est = estimate_peak_memory(row.arch, spec.resolution, row.batch, 16, "bf16", bool(row.checkpointing),
                                   targets=row.targets, checkpointing_share=float(row.checkpointing),
                                   fp32_norms=row.fp32_norms)
        out["estimate"] = est.as_dict()
        out["estimate_error"] = (est.total_gb - result.peak_memory_gb) / result.peak_memory_gb
    if row.profile:
        from dataclasses import replace

        from lora_trainer.bench.profile import profile_bench

        prof_spec = replace(spec, steps=10 if device == "cuda" else 2, warmup=10 if device == "cuda" else 1,
                            cpu_low_precision=False)
        out["profile"] = [p.as_dict() for p in profile_bench(prof_spec)]
    out["seconds"] = time.perf_counter() - started
    return out


def _cell(value: float | None, fmt: str, unit: str = "") -> str:
    return "—" if value is None else format(value, fmt) + unit


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [_title(env), "",
             "| run | ours it/s | ours img/s | plain loop it/s | ours / plain | MFU | first step s | peak before loop | "
             "peak in loop | estimate | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']['name']} | failed: {r['error']} ||||||||||")
            continue
        res, est = r["result"], r.get("estimate")
        extra = res.get("extra", {})
        lines.append(
            f"| {r['row']['name']} | {res['steps_per_s']:.2f} | {res['images_per_s']:.1f} "
            f"| {_cell(res['reference_steps_per_s'], '.2f')} | {_cell(res['ratio_to_reference'], '.2f')} "
            f"| {_cell(res['mfu'] and res['mfu'] * 100, '.1f', ' %')} | {res['time_to_first_step_s']:.0f} "
            f"| {_cell(extra.get('setup_peak_gb'), '.2f')} | {_cell(extra.get('loop_peak_gb'), '.2f')} "
            f"| {_cell(est and est['total_gb'], '.2f')} | {_cell(r.get('estimate_error') and r['estimate_error'] * 100, '+.1f', ' %')} |")
    for r in rows:
        for p in r.get("profile", []):
            kernels = _cell(p["kernels_per_step"], ".0f")
            lines.append("")
            lines.append(f"Profile of {r['row']['name']}, {p['loop']}: {p['ops_per_step']:.0f} aten ops per step "
                         f"({p['computing_ops_per_step']:.0f} computing), {p['casts_per_step']:.0f} dtype casts, "
                         f"{p['format_conversions_per_step']:.0f} layout conversions, {kernels} CUDA kernels")
    return "\n".join(lines) + "\n"


def environment(size: str, device: str) -> dict[str, Any]:
    import diffusers
    import peft
    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({platform.machine()})"
    return {"device": name, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "size": size}


def _px(env: dict[str, Any]) -> str:
    """The resolution in the title when every row has the same one (tiny models, or --resolution)."""
    px = env.get("resolution") or (64 if env["size"] == "tiny" else None)
    return f" ({px} px)" if px else ""


def _compiled(env: dict[str, Any]) -> str:
    if not env.get("compile"):
        return ""
    return f", our UNet compiled ({env.get('compile_mode') or 'default'}; first compiles not timed)"


def _title(env: dict[str, Any]) -> str:
    return (f"{env['device']}, torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; "
            f"{env['size']} models{_px(env)}, random weights, rank 16, "
            f"cached latents{_compiled(env)}; peaks and estimate in GiB")


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m lora_trainer.bench.rows", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for rows.json and rows.md")
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 30 on a GPU, 3 on a CPU)")
    p.add_argument("--only", default=None, help="comma-separated row numbers (1-based) to run")
    p.add_argument("--compile", action="store_true", help="our loop with train.compile (torch.compile the UNet)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="train.compile_mode (implies --compile); reduce-overhead records CUDA graphs")
    p.add_argument("--resolution", type=int, default=None,
                   help="every row at this resolution (default: the row's own; 64 with --size tiny): "
                        "checks the full-size rows on a CPU at 64 px")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = args.steps or (30 if device == "cuda" else 3)
    warmup = 5 if device == "cuda" else 1
    chosen = [ROWS[int(i) - 1] for i in args.only.split(",")] if args.only else list(ROWS)
    mode = args.compile_mode or ("default" if args.compile else None)
    env = {**environment(args.size, device), "compile": mode is not None, "compile_mode": mode,
           "resolution": args.resolution}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for row in chosen:
        print(f"== {row.name}", flush=True)
        try:
            rows.append(run_row(row, args.size, steps, warmup, device, mode, args.resolution))
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            traceback.print_exc()
            rows.append({"row": asdict(row), "error": f"{type(e).__name__}: {e}".splitlines()[0][:200]})
        if device == "cuda":
            torch.cuda.empty_cache()
        # written after every row: a run cut short still leaves what it measured
        atomic_write_text(args.out / "rows.json", json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
        atomic_write_text(args.out / "rows.md", markdown(rows, env))
    print(markdown(rows, env))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
