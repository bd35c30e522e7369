"""The embedded demo model and the ``demo`` command: a base that draws the demo shapes, made
reproducibly by the script in the package, and a demo run whose LoRA visibly teaches it pink."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_trainer.data import demo as drawing
from lora_trainer.models import demo_base, demo_pretrain

TINY = demo_pretrain.PretrainArgs(images=16, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2)


def border_rgb(img) -> np.ndarray:
    """Mean colour of a ring near the edge (the background around the shape), leaving out the
    outermost pixels, where the tiny VAE draws a frame of its own."""
    a = np.asarray(img.convert("RGB"), dtype=np.float64)
    side = a.shape[0]
    outer, inner = side // 16, side // 5
    mask = np.zeros(a.shape[:2], dtype=bool)
    mask[outer:side - outer, outer:side - outer] = True
    mask[inner:side - inner, inner:side - inner] = False
    return a[mask].mean(axis=0)


def distance(rgb: np.ndarray, target: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(rgb - np.asarray(target, dtype=np.float64)))


def test_the_shipped_file_is_small_and_loads_without_random_numbers():
    assert demo_base.WEIGHTS_PATH.stat().st_size < 4_000_000
    torch.manual_seed(1)
    a = demo_base.load_components()
    torch.manual_seed(2)  # another RNG state: the same model
    b = demo_base.load_components()
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    unet = a["unet"].config
    assert len(unet.block_out_channels) == 4 and unet.layers_per_block == 2  # SD1's topology: its LoRA keys
    assert 2 ** (len(a["vae"].config.block_out_channels) - 1) == 8


def test_the_shipped_file_was_made_by_the_script_with_its_defaults():
    from safetensors import safe_open

    with safe_open(str(demo_base.WEIGHTS_PATH), "pt") as f:
        build = json.loads(f.metadata()["build"])
        shipped = {k: f.get_slice(k).get_shape() for k in f.keys()}
    defaults = {k: v for k, v in demo_pretrain.PretrainArgs().__dict__.items()}
    assert {k: build[k] for k in defaults} == defaults and build["script"] == "lora_trainer.models.demo_pretrain"
    tensors, _ = demo_pretrain.pretrain(TINY, log=lambda *a: None)
    assert {k: list(v.shape) for k, v in tensors.items()} == shipped


def test_pretraining_is_reproducible():
    first, meta1 = demo_pretrain.pretrain(TINY, log=lambda *a: None)
    second, meta2 = demo_pretrain.pretrain(TINY, log=lambda *a: None)
    assert meta1 == meta2 and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_stored_vocabulary_covers_every_demo_caption():
    from lora_trainer.models.tokenizer import load_clip_tokenizer

    parts = demo_base.load_components()
    emb = parts["text_encoder"].get_input_embeddings().weight
    tokenizer = load_clip_tokenizer()
    ids = {t for c in demo_pretrain.all_captions() for t in tokenizer(c).input_ids}
    assert all(emb[i].abs().sum() > 0 for i in ids)  # stored rows; the others are zero


def render(prompt: str, seed: int = 3):
    from lora_trainer.config import ModelConfig, SampleConfig
    from lora_trainer.models.loaders import load_bundle
    from lora_trainer.train.sampler import render_sample

    bundle = load_bundle(ModelConfig(base_model="demo"), "cpu", torch.float32)
    return render_sample(bundle, SampleConfig(prompt=prompt, steps=20, guidance_scale=4.0, seed=seed), 64, 64)


def test_the_base_model_draws_the_background_it_is_asked_for():
    for colour in ("blue", "white", "yellow"):
        rgb = border_rgb(render(f"a red circle on a {colour} background"))
        nearest = min(drawing.COLOURS, key=lambda c: distance(rgb, drawing.COLOURS[c]))
        assert nearest == colour, (colour, rgb)


@pytest.mark.slow
def test_the_demo_shows_learning(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """The README's first command: the loss falls, and the LoRA turns the background pink."""
    from PIL import Image

    from lora_trainer.cli import main

    assert main(["demo", "--dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("loss "))
    first, last = (float(v) for v in line.split()[1:4:2])
    assert last < first * 0.7, line  # mean of the first 10 steps vs the last 10, fixed seed (0.063 -> 0.023 here)
    sweep = tmp_path / "output" / "weight_sweep.png"
    assert f"weight sweep saved to {sweep}" in out
    sheet = Image.open(sweep)
    w = sheet.width // 2
    base, lora = sheet.crop((0, 14, w, sheet.height)), sheet.crop((w, 14, 2 * w, sheet.height))
    to_pink = distance(border_rgb(base), drawing.LESSON_RGB), distance(border_rgb(lora), drawing.LESSON_RGB)
    # plain to see, in the trained direction: a blue background at weight 0, pink at 1 (205 -> 45 here)
    assert to_pink[1] < 80 and to_pink[0] > to_pink[1] + 100, to_pink
    samples = sorted((tmp_path / "output" / "samples" / "demo_lora").glob("*.png"))
    assert len(samples) >= 3
    assert distance(border_rgb(Image.open(samples[-1])), drawing.LESSON_RGB) < \
        distance(border_rgb(Image.open(samples[0])), drawing.LESSON_RGB) - 50  # samples turn pink as it learns (136 -> 40)
