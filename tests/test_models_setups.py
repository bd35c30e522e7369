"""bundle_from_diffusers: the callables match what the diffusers pipelines compute."""

from __future__ import annotations

import functools

import pytest
import torch

from lora_trainer.errors import ModelLoadError
from lora_trainer.families import family_names
from lora_trainer.models import tiny
from lora_trainer.models.setups import bundle_from_diffusers, default_size_info

CAPTIONS = ["a photo of a cat", "a red car, masterpiece"]



@functools.cache
def _parts(arch):
    """Shared read-only tiny parts (building them costs seconds); tests that change them build their own."""
    return tiny.build_components(arch, seed=0)


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def arch_parts(request):
    return request.param, _parts(request.param)


def _pipeline(arch, parts):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        return StableDiffusionXLPipeline(**parts)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _final_norm(te):
    # transformers 5 flattens CLIPTextModel (no .text_model); 4.x nests it.
    return getattr(te, "text_model", te).final_layer_norm


def test_registry_is_explicit():
    assert {"sd1", "sd2", "sdxl"} <= set(family_names())


def test_bundle_callables_shapes(arch_parts):
    arch, parts = arch_parts
    bundle = bundle_from_diffusers(parts, arch, None, "cpu", torch.float32, name="tiny")
    assert bundle.arch == arch and bundle.unet_naming == "diffusers"
    assert [p.key for p in bundle.text_encoders] == (["te1", "te2"] if arch == "sdxl" else ["te"])
    assert all(p.naming == "hf_clip" for p in bundle.text_encoders)
    assert bundle.num_train_timesteps == 1000
    assert torch.allclose(bundle.alphas_cumprod, parts["scheduler"].alphas_cumprod)
    assert bundle.default_resolution == 64 and bundle.vae_scale_factor == 8

    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 48) * 2 - 1
    latents = bundle.encode_images(pixels)
    assert latents.shape == (2, 4, 8, 6)
    cond = bundle.encode_text(CAPTIONS)
    width = 64 if arch == "sdxl" else 32
    assert cond["context"].shape == (2, 77, width)
    out = bundle.predict(latents, torch.tensor([10, 500]), cond, None)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    pixels_back = bundle.decode_latents(latents)
    assert pixels_back.shape == pixels.shape and pixels_back.abs().max() <= 1


def test_encode_text_matches_diffusers_pipeline(arch_parts):
    """The same conditioning the diffusers pipeline's encode_prompt builds (what renders use)."""
    arch, parts = arch_parts
    bundle = bundle_from_diffusers(parts, arch, None, "cpu", torch.float32)
    pipe = _pipeline(arch, parts)
    with torch.no_grad():
        cond = bundle.encode_text(CAPTIONS)
        if arch == "sdxl":
            ref, _, pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
            assert torch.allclose(cond["pooled"], pooled, atol=1e-6)
        else:
            ref, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, False)
    assert torch.allclose(cond["context"], ref, atol=1e-6)


def test_sd2_uses_final_layer_of_truncated_encoder():
    """SD2's diffusers text encoder ends at OpenCLIP's penultimate layer: use it with the final norm."""
    parts = _parts("sd2")
    bundle = bundle_from_diffusers(parts, "sd2")
    te = parts["text_encoder"]
    ids = parts["tokenizer"](CAPTIONS, max_length=77, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states
        expected = _final_norm(te)(hs[-1])
        got = bundle.encode_text(CAPTIONS)["context"]
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, _final_norm(te)(hs[-2]), atol=1e-3)


def test_sdxl_pooled_and_time_ids():
    parts = _parts("sdxl")
    bundle = bundle_from_diffusers(parts, "sdxl")
    cond = bundle.encode_text(CAPTIONS)
    assert cond["pooled"].shape == (2, 32)
    latents = torch.randn(2, 4, 8, 6)
    ids = default_size_info(latents)
    assert ids.tolist() == [[64, 48, 0, 0, 64, 48]] * 2
    t = torch.tensor([100, 100])
    with torch.no_grad():
        default = bundle.predict(latents, t, cond, None)
        explicit = bundle.predict(latents, t, cond, ids)
        cropped = bundle.predict(latents, t, cond, torch.tensor([[128.0, 96, 32, 16, 64, 48]] * 2))
    assert torch.equal(default, explicit)
    assert not torch.allclose(default, cropped)
    # The VAE stays fp32 even when the rest is half precision.
    assert bundle.extras["vae_dtype"] == torch.float32


def test_sdxl_vae_kept_fp32_with_half_weights():
    parts = tiny.build_components("sdxl", seed=0)
    bundle = bundle_from_diffusers(parts, "sdxl", dtype=torch.bfloat16)
    assert next(bundle.vae.parameters()).dtype == torch.float32
    assert next(bundle.unet.parameters()).dtype == torch.bfloat16
    latents = bundle.encode_images(torch.zeros(1, 3, 64, 64))
    assert latents.dtype == torch.bfloat16


def test_encode_text_keeps_grad_when_encoder_trains():
    parts = tiny.build_components("sd1", seed=0)
    bundle = bundle_from_diffusers(parts, "sd1")
    bundle.text_encoders[0].module.requires_grad_(True)
    assert bundle.encode_text(["x"])["context"].requires_grad


def test_prediction_type_from_scheduler_and_errors():
    parts = tiny.build_components("sd2", seed=0, prediction_type="v_prediction")
    assert bundle_from_diffusers(parts, "sd2", "auto").prediction_type == "v_prediction"
    assert bundle_from_diffusers(parts, "sd2", "epsilon").prediction_type == "epsilon"
    with pytest.raises(ModelLoadError, match="sample"):
        bundle_from_diffusers(parts, "sd2", "sample")
    with pytest.raises(ModelLoadError, match="text_encoder_2"):
        bundle_from_diffusers(parts, "sdxl")
    with pytest.raises(ModelLoadError, match="model.arch"):
        bundle_from_diffusers(parts, "sd9")


def test_sdxl_conditioning_survives_lora_inject_and_remove():
    """Training injects LoRA and encodes text, then removes it; the model must then encode as before
    (transformers' hidden-state hooks must not be installed a second time)."""
    from lora_trainer.config import NetworkConfig
    from lora_trainer.lora.inject import inject_lora

    parts = tiny.build_components("sdxl", seed=0)
    bundle = bundle_from_diffusers(parts, "sdxl")
    with torch.no_grad():
        before = bundle_from_diffusers(_parts("sdxl"), "sdxl").encode_text(CAPTIONS)  # same seed, untouched
        # The first text encoding of this bundle happens with LoRA injected, as in a training run.
        net = inject_lora(bundle, NetworkConfig(rank=4, alpha=4.0, train_text_encoder=True))
        bundle.encode_text(CAPTIONS)
        net.remove()
        after = bundle.encode_text(CAPTIONS)
    assert torch.equal(before["context"], after["context"]) and torch.equal(before["pooled"], after["pooled"])
    ids = parts["tokenizer"](CAPTIONS, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert len(parts["text_encoder"](ids, output_hidden_states=True).hidden_states) == 3  # embeddings + 2 layers
