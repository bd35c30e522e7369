"""Shared checks of the rectified-flow families' tests (Flux.1, SD3.5) on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_trainer.families.flow_lora import dit_lora_key
from lora_trainer.families.flow_parts import block_linear_targets
from lora_trainer.models.bundle import ModelBundle
from lora_trainer.train.trainer import Trainer
from tests.train_helpers import TinyHost, lora_tensors, make_data, tiny_config


def fixed_image_latents(bundle: ModelBundle, data: Path) -> tuple[torch.Tensor, str]:
    from lora_trainer.data.captions import read_metadata_csv
    from lora_trainer.data.dataset import pil_to_tensor
    from lora_trainer.data.images import open_image_rgb

    img = pil_to_tensor(open_image_rgb(data / "demo_000.png").resize((64, 64)))[None]
    with torch.no_grad():
        return bundle.encode_images(img), read_metadata_csv(data / "metadata.csv")["demo_000.png"]


@torch.no_grad()
def eval_loss(bundle: ModelBundle, latents: torch.Tensor, caption: str, extra: dict[str, torch.Tensor]) -> float:
    """Flow-matching loss at fixed sigmas and noise: lower when the model has learnt the image."""
    gen = torch.Generator().manual_seed(7)
    total = 0.0
    cond = {**bundle.encode_text([caption]), **extra}
    for sigma in (0.25, 0.5, 0.75):
        noise = torch.randn(latents.shape, generator=gen)
        noisy = (1 - sigma) * latents + sigma * noise
        pred = bundle.predict(noisy, torch.tensor([sigma]), cond, None)
        total += float(torch.nn.functional.mse_loss(pred, noise - latents))
    return total / 3


def train_memorises(bundle: ModelBundle, tmp: Path, extra: dict[str, torch.Tensor], steps: int = 60,
                    **values: Any) -> tuple[float, float, Any, TinyHost]:
    """Train on one image (text cached, a sample at the end); the eval loss before and after
    (the saved file read back into fresh LoRA layers), the result and the host."""
    from lora_trainer.lora.inject import inject_lora

    one = make_data(tmp / "one", n=1)
    cfg = tiny_config(one, tmp / "out", **{"train.max_train_steps": steps, "optim.learning_rate": 1e-2,
                                           "output.save_precision": "fp32", "sample.prompt": "a red circle",
                                           "sample.steps": 3, **values})
    latents, caption = fixed_image_latents(bundle, one)
    before = eval_loss(bundle, latents, caption, extra)
    host = TinyHost(bundle=bundle)
    result = Trainer(cfg, host=host).run()
    net = inject_lora(bundle, cfg.network)
    try:
        net.load_kohya(lora_tensors(result.lora_path))
        after = eval_loss(bundle, latents, caption, extra)
    finally:
        net.remove()
    return before, after, result, host


def expected_unet_keys(family: str, bundle: ModelBundle) -> set[str]:
    """The file's transformer keys: one per file layer (q/k/v and Flux's linear1 parts fused)."""
    return {dit_lora_key(family, "unet", p).partition("@")[0] for p in block_linear_targets(bundle.unet)}


def module_keys(path: Path) -> set[str]:
    return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora_tensors(path)}


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


_SD3_TOP = {"pos_embed.pos_embed": "pos_embed", "pos_embed.proj": "x_embedder.proj",
            "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
            "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
            "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
            "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "context_embedder": "context_embedder",
            "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
_SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
              "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
              "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
              "attn2.to_out.0": "x_block.attn2.proj", "attn2.norm_q": "x_block.attn2.ln_q",
              "attn2.norm_k": "x_block.attn2.ln_k", "norm1.linear": "x_block.adaLN_modulation.1",
              "norm1_context.linear": "context_block.adaLN_modulation.1", "ff.net.0.proj": "x_block.mlp.fc1",
              "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
              "ff_context.net.2": "context_block.mlp.fc2"}
_SD3_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def sd3_original_state_dict(transformer: torch.nn.Module, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    """A diffusers SD3 transformer's weights in Stability's layout (the inverse of diffusers'
    single-file converter), to test single-file loading on a tiny model."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    last = transformer.config.num_layers - 1
    out: dict[str, torch.Tensor] = {}
    for i in range(last + 1):
        for orig, parts in _SD3_QKV.items():
            for suffix in ("weight", "bias"):
                names = [f"transformer_blocks.{i}.{p}.{suffix}" for p in parts]
                if names[0] in sd:
                    out[f"joint_blocks.{i}.{orig}.{suffix}"] = torch.cat([sd.pop(n) for n in names])
        for ours, orig in _SD3_BLOCK.items():
            for suffix in ("weight", "bias"):
                name = f"transformer_blocks.{i}.{ours}.{suffix}"
                if name in sd:
                    w = sd.pop(name)
                    out[f"joint_blocks.{i}.{orig}.{suffix}"] = _swap_halves(w) if i == last and "context" in ours else w
    for ours, orig in _SD3_TOP.items():
        for suffix in ("", ".weight", ".bias"):
            if ours + suffix in sd:
                w = sd.pop(ours + suffix)
                out[orig + suffix] = _swap_halves(w) if ours == "norm_out.linear" else w
    assert not sd, f"unmapped: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def write_config_folder(parts: dict[str, Any], folder: Path) -> Path:
    """A config-only folder (``<part>/config.json``, no weights) of tiny pipeline parts."""
    for sub, part in parts.items():
        if sub == "transformer" or sub == "vae":
            part.save_config(str(folder / sub))
        elif sub.startswith("text_encoder"):
            part.config.save_pretrained(str(folder / sub))
    return folder


def save_pipeline(family: str, parts: dict[str, Any], folder: Path) -> Path:
    """A diffusers pipeline folder (FluxPipeline / StableDiffusion3Pipeline) of tiny parts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if family == "flux1" else StableDiffusion3Pipeline
    kept = {k: v for k, v in parts.items() if k != "t5_max_length"}
    cls(scheduler=FlowMatchEulerDiscreteScheduler(), **kept).save_pretrained(str(folder))
    return folder


@torch.no_grad()
def same_outputs(a: ModelBundle, b: ModelBundle, extra: dict[str, torch.Tensor] | None = None) -> bool:
    """Both bundles encode a caption and predict a fixed input alike (to float tolerance)."""
    ca, cb = a.encode_text(["a red circle"]), b.encode_text(["a red circle"])
    if ca.keys() != cb.keys() or not all(torch.allclose(ca[k], cb[k], atol=1e-5) for k in ca):
        return False
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.4])
    pa = a.predict(x, t, {**ca, **(extra or {})}, None)
    return torch.allclose(pa, b.predict(x, t, {**cb, **(extra or {})}, None), atol=1e-5)


_FLUX_TOP = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
                "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_SINGLE = {"norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm",
                "proj_out": "linear2"}
_FLUX_CAT = {("double_blocks", "img_attn.qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
             ("double_blocks", "txt_attn.qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
             ("single_blocks", "linear1"): ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def _bfl_name(suffix: str, orig: str) -> str:
    # BFL's RMSNorm keeps its weight as ``scale``
    return f"{orig}.scale" if orig.endswith("_norm") and suffix == "weight" else f"{orig}.{suffix}"


def flux_original_state_dict(sd: dict[str, torch.Tensor], num_double: int, num_single: int,
                             prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Flux transformer's state dict in BFL's layout (the inverse of diffusers'
    single-file converter)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    for blocks, ours_blocks, table, n in (("double_blocks", "transformer_blocks", _FLUX_DOUBLE, num_double),
                                          ("single_blocks", "single_transformer_blocks", _FLUX_SINGLE, num_single)):
        for i in range(n):
            for (kind, orig), parts in _FLUX_CAT.items():
                for suffix in ("weight", "bias"):
                    if kind == blocks:
                        out[f"{blocks}.{i}.{orig}.{suffix}"] = torch.cat(
                            [sd.pop(f"{ours_blocks}.{i}.{p}.{suffix}") for p in parts])
            for ours, orig in table.items():
                for suffix in ("weight", "bias"):
                    name = f"{ours_blocks}.{i}.{ours}.{suffix}"
                    if name in sd:
                        out[f"{blocks}.{i}.{_bfl_name(suffix, orig)}"] = sd.pop(name)
    for ours, orig in _FLUX_TOP.items():
        for suffix in ("weight", "bias"):
            if f"{ours}.{suffix}" in sd:
                w = sd.pop(f"{ours}.{suffix}")
                out[f"{orig}.{suffix}"] = _swap_halves(w) if ours == "norm_out.linear" else w
    assert not sd, f"unmapped: {sorted(sd)[:5]}"
    return {prefix + k: v for k, v in out.items()}


def assert_family_metadata(path: Path, family: str, variant: str) -> None:
    """The file says which family and variant it was trained on, and is detected as that family."""
    from lora_trainer.families import detect_lora
    from lora_trainer.families.flow_lora import DIT_METADATA
    from lora_trainer.lora.files import read_lora_file

    tensors, metadata = read_lora_file(path)
    for key, value in DIT_METADATA[f"{family}-{variant}"].items():
        assert metadata[key] == value, key
    found = detect_lora({k.split(".")[0] for k in tensors}, metadata)
    assert found is not None and found.name == family


def check_test_render(family: str, variant: str, tok_dir: Path, tmp: Path, guidance: float) -> None:
    """The standalone app's Test section on a trained LoRA of a family without a diffusers
    pipeline here: one image per weight, weight 0 the bare model bit for bit, the family's
    guidance unless one is given, and nothing of the LoRA left on the model."""
    import numpy as np
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lora_trainer.config import SampleConfig
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.models import placement
    from lora_trainer.train.sampler import render_sample

    folder = save_pipeline(family, build_components(family, variant, tok_dir), tmp / "model")
    host = StandaloneHost()
    cfg = tiny_config(make_data(tmp / "d", n=2), tmp / "out", **{"model.base_model": str(folder),
                                                                 "train.max_train_steps": 4,
                                                                 "optim.learning_rate": 1e-2})
    name = Trainer(cfg, host=host).run().lora_path.stem
    bundle = host._last_bundle
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    zero, one = host.render("a red circle", "", 3, name, [0.0, 1.0], 3, 64, 48)
    assert zero.size == one.size == (64, 48)
    with placement.denoiser_placed(bundle):
        bare = render_sample(bundle, SampleConfig(prompt="a red circle", seed=3, steps=3, guidance_scale=guidance),
                             64, 48)
    assert np.array_equal(np.asarray(zero), np.asarray(bare))
    assert not np.array_equal(np.asarray(one), np.asarray(zero))
    assert np.array_equal(np.asarray(host.render("a red circle", "", 3, name, [1.0], 3, 64, 48, guidance)[0]),
                          np.asarray(one))
    after = bundle.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, BaseTunerLayer) for root in bundle.trainable_roots().values() for m in root.modules())
