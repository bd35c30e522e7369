"""Make the embedded demo model's weights: ``python -m lora_trainer.models.demo_pretrain``.

A seeded CPU run, in two stages on shapes drawn by ``data/demo.py``:

1. the VAE learns to reconstruct 64 px drawings in the eight base colours and the demo's pink
   (8 x 8 x 4 latents): like SD's VAE it is a codec, not the part that knows what to draw, and
   without pink among its images it decodes the demo dataset's pink as another colour;
2. on drawings in the eight base colours only (never the demo dataset's pink), the UNet learns
   to denoise their latents, conditioned on the captions through a tiny CLIP text encoder
   trained with it (10 % empty captions, for classifier-free guidance). A random text encoder's
   outputs differ too little between captions for the UNet to follow them.

Same arguments, same torch and the same thread count give the same tensors and metadata. The
full run takes about 10 minutes on one CPU core; ``--vae-steps``/``--unet-steps`` shorten it (the tests run a
few steps to check that it is reproducible).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_trainer.data import demo as drawing
from lora_trainer.models import demo_base, tiny


@dataclass
class PretrainArgs:
    seed: int = 0
    images: int = 2048
    vae_steps: int = 800
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_logvar: float = -8.0  # the encoder's log-variance is pulled here: little noise when latents are sampled
    unet_steps: int = 1500
    unet_batch: int = 32
    unet_lr: float = 2e-3
    uncond_prob: float = 0.1
    threads: int = 1


def random_scene(rng: random.Random) -> tuple[Any, str]:
    """One drawing of the base world (a shape in a base colour on another) and its caption."""
    names = list(drawing.COLOURS)
    shape = rng.choice(drawing.SHAPES)
    fg, bg = rng.sample(names, 2)
    img = drawing.draw_scene(shape, drawing.COLOURS[fg], drawing.COLOURS[bg], rng.uniform(0.3, 0.7),
                             rng.uniform(0.3, 0.7), rng.uniform(0.18, 0.36), size=demo_base.RESOLUTION)
    return img, drawing.caption_for(shape, fg, bg)


def codec_scene(rng: random.Random) -> Any:
    """A drawing for the VAE: a shape in a base colour or pink on another of them."""
    colours = [*drawing.COLOURS.values(), drawing.LESSON_RGB]
    fg, bg = rng.sample(colours, 2)
    return drawing.draw_scene(rng.choice(drawing.SHAPES), fg, bg, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7),
                              rng.uniform(0.18, 0.36), size=demo_base.RESOLUTION)


def _pixels(images: list[Any]) -> torch.Tensor:
    arr = torch.from_numpy(np.stack([np.asarray(img, dtype=np.float32) for img in images]))
    return arr.permute(0, 3, 1, 2) / 127.5 - 1


def all_captions() -> list[str]:
    """Every caption of the base world and of the demo dataset (their words are the stored vocabulary)."""
    names = list(drawing.COLOURS)
    base = [drawing.caption_for(s, fg, bg) for s in drawing.SHAPES for fg in names for bg in names if fg != bg]
    lesson = [drawing.caption_for(s, fg, drawing.LESSON_COLOUR) for s in drawing.SHAPES for fg in names]
    return base + lesson


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def train_vae(vae: Any, pixels: torch.Tensor, a: PretrainArgs, gen: torch.Generator, log: Any) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    for step in range(a.vae_steps):
        _set_lr(opt, _lr(step, a.vae_steps, a.vae_lr))
        x = pixels[torch.randint(0, len(pixels), (a.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        # Not the usual KL term: its pull towards unit variance drowns small latents in noise
        # that a model this small never learns to see through; a fixed small variance instead.
        loss = torch.nn.functional.mse_loss(recon, x) + 0.01 * (posterior.logvar - a.vae_logvar).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("vae", step, a.vae_steps, loss.item())
    vae.eval().requires_grad_(False)


def train_unet(unet: Any, te: Any, latents: torch.Tensor, stds: torch.Tensor, token_ids: torch.Tensor,
               caption_idx: torch.Tensor, a: PretrainArgs, gen: torch.Generator, log: Any) -> None:
    """eps-prediction on the DDPM schedule the trainer uses; token_ids[-1] is the empty caption."""
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler(**tiny.SCHEDULER_KWARGS).alphas_cumprod.float()
    opt = torch.optim.AdamW([*unet.parameters(), *te.parameters()], lr=a.unet_lr, weight_decay=0.0)
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    for step in range(a.unet_steps):
        _set_lr(opt, _lr(step, a.unet_steps, a.unet_lr))
        pick = torch.randint(0, len(latents), (a.unet_batch,), generator=gen)
        x0 = latents[pick] + stds[pick] * torch.randn(latents[pick].shape, generator=gen)
        cap = caption_idx[pick].clone()
        cap[torch.rand(a.unet_batch, generator=gen) < a.uncond_prob] = len(token_ids) - 1
        context = te(token_ids[cap]).last_hidden_state
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(alphas), (a.unet_batch,), generator=gen)
        ac = alphas[t].view(-1, 1, 1, 1)
        noisy = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log("unet", step, a.unet_steps, loss.item())
    unet.eval().requires_grad_(False)
    te.eval().requires_grad_(False)


def _logger(every: int = 100) -> Any:
    state: dict[str, Any] = {"t0": time.monotonic(), "sum": 0.0, "n": 0}

    def log(stage: str, step: int, steps: int, loss: float) -> None:
        state["sum"] += loss
        state["n"] += 1
        if (step + 1) % every == 0 or step + 1 == steps:
            print(f"{stage} {step + 1}/{steps} loss {state['sum'] / state['n']:.4f} "
                  f"({time.monotonic() - state['t0']:.0f}s)", flush=True)
            state["sum"], state["n"] = 0.0, 0

    return log


def pretrain(a: PretrainArgs, log: Any = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Train the demo model from scratch; returns the tensors and metadata of its file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.families.sd_text import tokenize as _tokenize
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    log = log or _logger()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    rng = random.Random(a.seed)
    unet, vae = UNet2DConditionModel(**demo_base.unet_config()), AutoencoderKL(**demo_base.vae_config())
    te = CLIPTextModel(CLIPTextConfig(**tiny.text_config("quick_gelu")))
    tokenizer = load_clip_tokenizer()
    # -- stage 1: the VAE, on every colour of the demo
    train_vae(vae, _pixels([codec_scene(rng) for _ in range(a.images)]), a, gen, log)
    # -- stage 2: the UNet, on the base world's drawings
    scenes = [random_scene(rng) for _ in range(a.images)]
    pixels = _pixels([img for img, _ in scenes])
    with torch.no_grad():
        dist = torch.cat([torch.cat([d.mean, d.std], 1) for d in
                          (vae.encode(chunk).latent_dist for chunk in pixels.split(256))])
    mean, std = dist.chunk(2, dim=1)
    with torch.no_grad():
        recon = vae.decode(mean[:256]).sample
    print(f"vae reconstruction mse {float(torch.nn.functional.mse_loss(recon, pixels[:256])):.4f}, "
          f"posterior std / latent std {float(std.mean() / mean.std()):.3f}", flush=True)
    scale = float(1 / mean.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    captions = sorted({c for _, c in scenes})
    token_ids = _tokenize(tokenizer, captions + [""], torch.device("cpu"))
    index = {c: i for i, c in enumerate(captions)}
    caption_idx = torch.tensor([index[c] for _, c in scenes])
    sf = vae.config.scaling_factor
    train_unet(unet, te, mean * sf, std * sf, token_ids, caption_idx, a, gen, log)
    token_ids = [int(t) for ids in tokenizer(all_captions() + [""]).input_ids for t in ids]
    info = {**asdict(a), "torch": torch.__version__, "script": "lora_trainer.models.demo_pretrain"}
    return demo_base.pack({"unet": unet, "vae": vae, "text_encoder": te}, token_ids, info)


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainArgs()
    ap = argparse.ArgumentParser(prog="python -m lora_trainer.models.demo_pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(demo_base.WEIGHTS_PATH), help="output file (default: the packaged one)")
    for name, value in asdict(defaults).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(ap.parse_args(argv))
    out = Path(args.pop("out"))
    tensors, metadata = pretrain(PretrainArgs(**args))
    from safetensors.torch import save

    from lora_trainer.fsutil import atomic_write_bytes

    atomic_write_bytes(out, save(tensors, metadata=metadata))
    print(f"demo model written to {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
