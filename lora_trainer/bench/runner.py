"""``bench``: our training loop against the reference loop, on the same model and data.

The model has random weights (speed does not depend on their values): tiny models from config
on a CPU, or full-size SD1.5 / SDXL built from the packaged configs on a GPU. The data is a folder
of generated images at the benchmark resolution, so our loop runs exactly as it does for users:
scan, cache latents and text embeddings, then train.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_trainer.bench.flops import training_step_flops, unet_forward_flops
from lora_trainer.bench.reference import REFERENCE_TARGETS, run_reference_loop
from lora_trainer.config import TrainConfig, build_config
from lora_trainer.errors import ConfigError
from lora_trainer.hosts.standalone import StandaloneHost
from lora_trainer.lora.targets import default_unet_targets
from lora_trainer.models.bundle import ModelBundle
from lora_trainer.train.checkpointing import describe

# Dense bf16/fp16 peak of known accelerators (TFLOP/s), for model-FLOP utilisation.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0,
               "RTX 3090": 71.0, "A10": 125.0, "T4": 65.0}


@dataclass
class BenchSpec:
    arch: str = "sd1"
    size: str = "tiny"  # tiny | full
    resolution: int = 64
    batch_size: int = 1
    rank: int = 16
    precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: float = 0.0  # the share of the denoiser's blocks checkpointed (True: all)
    steps: int = 10
    warmup: int = 3
    device: str = "auto"
    reference: bool = True
    # "attention": the reference loop's targets; "kohya": our default targets (in both loops)
    targets: str = "attention"
    # On a CPU, fp16/bf16 weights and autocast as on a GPU (the profile's counts), not fp32
    cpu_low_precision: bool = False
    compile: bool = False  # train.compile: torch.compile the UNet in our loop
    compile_mode: str = "default"  # train.compile_mode
    fp32_norms: bool = False  # train.fp32_norms: GroupNorm / LayerNorm in fp32 under mixed precision


@dataclass
class BenchResult:
    spec: BenchSpec
    device: str
    torch_version: str
    steps_per_s: float
    images_per_s: float
    time_to_first_step_s: float
    peak_memory_gb: float
    peak_memory_kind: str
    unet_forward_tflop: float
    mfu: float | None
    reference_steps_per_s: float | None = None
    ratio_to_reference: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class BenchHost(StandaloneHost):
    """A standalone host whose model is one given bundle (random weights, built in memory)."""

    def __init__(self, bundle: ModelBundle, lora_dir: Path) -> None:
        super().__init__(keep_cache=True, lora_dir=lora_dir)
        self.bundle = bundle

    def acquire_bundle(self, config: TrainConfig) -> ModelBundle:
        return self.bundle

    def release_bundle(self, bundle: ModelBundle) -> None:
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def random_parts(arch: str, size: str, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Diffusers parts with random weights: tiny from config, or full size from packaged configs.
    Full-size parts are built on meta and filled with N(0, 0.02) right on ``device`` in ``dtype``
    (the SDXL VAE in fp32): seconds instead of minutes of CPU initialisation, and no fp32 copy of
    the UNet on the GPU."""
    from lora_trainer.models import tiny

    if size == "tiny":
        return tiny.build_components(arch, seed=seed)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_trainer.families import get_family
    from lora_trainer.models.checkpoint import prepared_config_folder
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    family = get_family(arch)
    folder = prepared_config_folder(arch)
    torch.manual_seed(seed)
    with torch.device("meta"):
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        for _, sub, _ in family.text_encoder_folders[1:]:  # SDXL's OpenCLIP-bigG (with projection)
            parts[sub] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / sub))
    vae_fp32 = family.vae_fp32
    for name, module in list(parts.items()):
        part_dtype = torch.float32 if name == "vae" and vae_fp32 else dtype
        module = module.to(part_dtype).to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.02)
            for b in module.buffers():  # position ids and the like: as the config builds them
                if b.is_floating_point():
                    b.zero_()
                else:
                    b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
        parts[name] = module.eval().requires_grad_(False)
    parts["scheduler"] = DDPMScheduler.from_pretrained(folder / "scheduler")
    for *_, tok in family.text_encoder_folders:
        parts[tok] = load_clip_tokenizer(pad_token=dict(family.tokenizer_pads)[tok])
    return parts


def make_images(folder: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """``n`` noise images with captions, at the benchmark resolution."""
    import numpy as np
    from PIL import Image

    from lora_trainer.data.captions import write_metadata_csv

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    captions = {}
    for i in range(n):
        arr = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:03d}.png")
        captions[f"img_{i:03d}.png"] = f"a benchmark image number {i}, noise"
    write_metadata_csv(folder / "metadata.csv", captions, backup=False)
    return folder


def bench_config(spec: BenchSpec, data: Path, out: Path, device: torch.device) -> TrainConfig:
    return build_config({
        "data.train_data_dir": str(data), "data.resolution": spec.resolution,
        "data.min_bucket_reso": spec.resolution, "data.max_bucket_reso": spec.resolution,
        "data.enable_buckets": False, "data.min_image_size": 8, "data.cache_latents": "memory",
        "network.rank": spec.rank, "network.alpha": spec.rank,
        "train.batch_size": spec.batch_size, "train.max_train_steps": spec.warmup + spec.steps,
        "train.mixed_precision": spec.precision, "train.gradient_checkpointing": bool(spec.gradient_checkpointing),
        "train.checkpointing_share": float(spec.gradient_checkpointing or 1.0),
        "optim.lr_scheduler": "constant", "output.output_dir": str(out), "output.tensorboard": False,
        "train.autosave_minutes": 0,  # a checkpoint written while it is timed would count as training time
        "output.output_name": "bench", "model.device": str(device),
        "network.target_modules": list(REFERENCE_TARGETS) if spec.targets == "attention" else [],
        "train.compile": spec.compile, "train.compile_mode": spec.compile_mode, "train.fp32_norms": spec.fp32_norms,
    })


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3, "cuda max allocated"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024**2, "process peak RSS"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _low_precision(spec: BenchSpec, device: torch.device) -> torch.dtype | None:
    """The dtype of weights and autocast: fp16/bf16 on a GPU (or a CPU told to run as one)."""
    if device.type == "cuda" or spec.cpu_low_precision:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    return None


def time_our_loop(spec: BenchSpec, device: torch.device, workdir: Path,
                  listeners: list[Any] | tuple = ()) -> dict[str, float]:
    """Run our Trainer; time to first step and steps/s over the steps after warm-up.
    ``listeners`` get the trainer's events too (the profile's step windows)."""
    from lora_trainer.models.setups import bundle_from_diffusers
    from lora_trainer.train.trainer import Trainer

    dtype = _low_precision(spec, device) or torch.float32
    data = make_images(workdir / "data", max(spec.batch_size * 2, 4), spec.resolution)
    marks: list[tuple[int, float]] = []  # (step, time) of each step event

    peaks: dict[str, float] = {}

    def on_event(ev: Any) -> None:
        # Step events come every step on a CPU and every few steps on a GPU; the loop itself never
        # waits on the device, so the benchmark syncs here to time what has really run.
        if ev.kind == "step":
            _sync(device)
            marks.append((ev.step, time.perf_counter()))
        elif ev.kind == "status" and device.type == "cuda" and ev.message.startswith("training "):
            # the loop starts: what came before (caching) and the loop get a peak each
            peaks["setup_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
            torch.cuda.reset_peak_memory_stats(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    parts = random_parts(spec.arch, spec.size, device=device, dtype=dtype)
    bundle = bundle_from_diffusers(parts, spec.arch, None, device, dtype,
                                   name=f"{spec.size}-{spec.arch}", default_resolution=spec.resolution)
    host = BenchHost(bundle, workdir / "out")
    Trainer(bench_config(spec, data, workdir / "out", device), host, [on_event, *listeners]).run()
    timed = [m for m in marks if m[0] >= spec.warmup]
    if len(timed) < 2:
        raise ConfigError(f"--steps {spec.steps}: too few steps to time; use at least 10 on a GPU")
    (s0, t0), (s1, t1) = timed[0], timed[-1]
    steps_per_s = (s1 - s0) / (t1 - t0)
    first_step, first_time = marks[0]
    # the first event may come after several steps: take their time off at the measured rate
    to_first = first_time - start - (first_step - 1) / steps_per_s
    if "setup_peak_gb" in peaks:
        peaks["loop_peak_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
    return {"time_to_first_step_s": to_first, "steps_per_s": steps_per_s, **peaks}


def time_reference(spec: BenchSpec, device: torch.device, windows: list[Any] | tuple = ()) -> float:
    low = _low_precision(spec, device)
    unet = random_parts(spec.arch, spec.size, device=device, dtype=low or torch.float32)["unet"].to(device)
    if low is not None:
        unet = unet.to(low)
    side = spec.resolution // 8
    cfg = unet.config
    latents = torch.randn(spec.batch_size, 4, side, side, device=device, dtype=unet.dtype)
    context = torch.randn(spec.batch_size, 77, cfg.cross_attention_dim, device=device, dtype=unet.dtype)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(spec.batch_size, pooled, device=device, dtype=unet.dtype),
                 "time_ids": torch.tensor([[spec.resolution, spec.resolution, 0, 0, spec.resolution, spec.resolution]] * spec.batch_size,
                                          device=device, dtype=unet.dtype)}
    if spec.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    targets = REFERENCE_TARGETS if spec.targets == "attention" else default_unet_targets(unet)  # like for like
    timing = run_reference_loop(unet, latents, context, rank=spec.rank, steps=spec.steps, warmup=spec.warmup,
                                targets=targets, autocast_dtype=low, added_cond=added, windows=windows)
    return timing.steps_per_s


def _peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_bench(spec: BenchSpec) -> BenchResult:
    device = resolve_device(spec.device)
    with tempfile.TemporaryDirectory(prefix="lora_trainer_bench_") as tmp:
        ours = time_our_loop(spec, device, Path(tmp))
    peak, kind = _peak_memory(device)
    split = {k: ours[k] for k in ("setup_peak_gb", "loop_peak_gb") if k in ours}
    if split:
        peak = max(split.values())
    ref = time_reference(spec, device) if spec.reference else None
    fwd = unet_forward_flops(spec.arch, spec.resolution, spec.batch_size, spec.size)
    peak_tflops = _peak_tflops(device)
    step_flops = training_step_flops(fwd)
    mfu = step_flops * ours["steps_per_s"] / (peak_tflops * 1e12) if peak_tflops else None
    return BenchResult(
        spec=spec, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch_version=torch.__version__, steps_per_s=ours["steps_per_s"],
        images_per_s=ours["steps_per_s"] * spec.batch_size, time_to_first_step_s=ours["time_to_first_step_s"],
        peak_memory_gb=peak, peak_memory_kind=kind, unet_forward_tflop=fwd / 1e12, mfu=mfu,
        reference_steps_per_s=ref, ratio_to_reference=(ours["steps_per_s"] / ref) if ref else None,
        extra=split,
    )


def format_table(r: BenchResult) -> str:
    s = r.spec
    rows = [
        ("model", f"{s.size} {s.arch}, {s.resolution}px, batch {s.batch_size}, rank {s.rank} ({s.targets} targets), "
                  f"precision {s.precision}, checkpointing {describe(s.gradient_checkpointing)}"
                  + (f", compiled ({s.compile_mode})" if s.compile else "")),
        ("device", f"{r.device} (torch {r.torch_version})"),
        ("steps/s", f"{r.steps_per_s:.3f}"),
        ("images/s", f"{r.images_per_s:.3f}"),
        ("time to first step", f"{r.time_to_first_step_s:.1f} s (build model + scan + cache)"),
        ("peak memory", f"{r.peak_memory_gb:.2f} GiB ({r.peak_memory_kind})" + (
            f"; before the loop {r.extra['setup_peak_gb']:.2f}, in the loop {r.extra['loop_peak_gb']:.2f}"
            if "loop_peak_gb" in r.extra else "")),
        ("UNet forward", f"{r.unet_forward_tflop * 1000:.2f} GFLOP per batch"),
        ("model-FLOP utilisation", f"{r.mfu * 100:.1f} %" if r.mfu is not None else "n/a (no known peak for this device)"),
    ]
    if r.reference_steps_per_s is not None:
        rows.append(("reference loop", f"{r.reference_steps_per_s:.3f} steps/s"))
        rows.append(("ours / reference", f"{r.ratio_to_reference:.2f}x"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def print_table(r: BenchResult) -> None:
    print(format_table(r), file=sys.stdout)
