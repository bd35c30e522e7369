"""SD3.5 (medium, large) on tiny models built from config: conditioning, training, files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_trainer.families import get_family
from lora_trainer.families.flow_lora import dit_lora_key
from lora_trainer.families.flow_parts import block_linear_targets
from lora_trainer.families.flow_tiny import T5_MAX_LENGTH, build_bundle
from tests.family_flow_helpers import (
    assert_family_metadata,
    count_calls,
    expected_unet_keys,
    module_keys,
    train_memorises,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t5tok")


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_bundle_follows_the_sd3_pipeline(tok_dir: Path, variant: str) -> None:
    b = build_bundle("sd3", variant, tok_dir)
    spec = b.objective_spec
    assert b.arch == "sd3" and b.prediction_type == "flow" and b.latent_channels == 16
    assert spec.kind == "flow" and spec.shift == 3.0 and spec.sampling == "logit_normal" and spec.cfg_sampling
    assert set(b.trainable_roots()) == {"unet", "te1", "te2"}  # T5 is never trained
    assert b.extras["variant"] == variant
    cond = b.encode_text(["a cat", "a dog"])
    # CLIP-L + CLIP-G penultimate states (77 tokens, 32 + 32 wide, zero-padded to T5's 96), then T5's
    assert cond["context"].shape == (2, 77 + T5_MAX_LENGTH, 96)
    assert torch.count_nonzero(cond["context"][:, :77, 64:]) == 0
    assert torch.count_nonzero(cond["context"][:, :77, :64]) > 0 and torch.count_nonzero(cond["context"][:, 77:]) > 0
    assert cond["pooled"].shape == (2, 64)  # pooled L + G projections


def test_timestep_is_sigma_times_1000(tok_dir: Path) -> None:
    b = build_bundle("sd3", "medium", tok_dir)
    seen = []
    b.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    with torch.no_grad():
        b.predict(torch.randn(1, 16, 8, 8), torch.tensor([0.25]), b.encode_text(["a cat"]), None)
    assert float(seen[0]) == pytest.approx(250.0)


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_training_memorises_one_image_caches_text_and_round_trips(tmp_path: Path, tok_dir: Path,
                                                                 variant: str) -> None:
    b = build_bundle("sd3", variant, tok_dir)
    t5_calls = count_calls(b.text_encoders[2].module)
    before, after, result, host = train_memorises(b, tmp_path, {})
    print(f"sd3-{variant}: eval loss before {before:.4f} after {after:.4f}; final training loss {result.final_loss:.4f}")
    assert after < 0.88 * before, (before, after)
    assert "sample" in [e.kind for e in host.events]
    assert t5_calls[0] == 1 + 2  # the cache once (never in the loop or the sample), eval before/after
    assert module_keys(result.lora_path) == expected_unet_keys("sd3", b)
    assert_family_metadata(result.lora_path, "sd3", variant)


def test_targets_cover_both_streams_and_the_second_attention(tok_dir: Path) -> None:
    b = build_bundle("sd3", "medium", tok_dir)
    keys = expected_unet_keys("sd3", b)
    for path in ("transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj",
                 "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.attn2.to_q",
                 "transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                 "transformer_blocks.1.attn.to_out.0"):
        assert dit_lora_key("sd3", "unet", path).partition("@")[0] in keys, path
    assert not any(".norm" in p for p in block_linear_targets(b.unet))  # adaLN modulation is left out, as kohya does
    assert get_family("sd3").default_targets("te3", b.text_encoders[2].module, "hf_t5") == []


def test_min_snr_gamma_on_a_flow_model_is_one_line(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.errors import ConfigError
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import TinyHost, make_data, tiny_config

    cfg = tiny_config(make_data(tmp_path / "d", n=1), tmp_path / "out", **{"train.min_snr_gamma": 5.0})
    with pytest.raises(ConfigError, match="train.min_snr_gamma") as err:
        Trainer(cfg, host=TinyHost(bundle=build_bundle("sd3", "medium", tok_dir))).run()
    assert "\n" not in str(err.value)


def test_detection_by_keys_with_or_without_prefix() -> None:
    from lora_trainer.families import detect_state_dict

    for key in ("joint_blocks.0.x_block.attn.qkv.weight", "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"):
        assert detect_state_dict({key: torch.zeros(1)}).name == "sd3"


def _parts(tok_dir: Path, variant: str = "medium") -> dict:
    from lora_trainer.families.flow_tiny import build_components

    parts = build_components("sd3", variant, tok_dir)
    parts.pop("t5_max_length")  # the loaders use the pipeline's 256 tokens
    return parts


def test_diffusers_folder_loads_offline(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.config import ModelConfig
    from lora_trainer.families.sd3 import sd3_bundle
    from lora_trainer.models.loaders import load_bundle
    from tests.family_flow_helpers import same_outputs, save_pipeline

    parts = _parts(tok_dir)
    folder = save_pipeline("sd3", parts, tmp_path / "sd35")
    ref = sd3_bundle(parts, torch.device("cpu"), torch.float32, "ref")
    loaded = load_bundle(ModelConfig(base_model=str(folder), device="cpu", weight_dtype="fp32"))
    assert loaded.arch == "sd3" and loaded.extras["variant"] == "medium"
    assert same_outputs(ref, loaded)


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_single_file_with_separate_parts_loads_offline(tmp_path: Path, tok_dir: Path, variant: str) -> None:
    from safetensors.torch import save_file

    from lora_trainer.config import ModelConfig
    from lora_trainer.families.sd3 import sd3_bundle
    from lora_trainer.models.loaders import load_bundle
    from tests.family_flow_helpers import same_outputs, sd3_original_state_dict, write_config_folder

    parts = _parts(tok_dir, variant)
    config = write_config_folder(parts, tmp_path / "config")
    save_file(sd3_original_state_dict(parts["transformer"]), str(tmp_path / "sd35.safetensors"))
    # CLIP-L with the "text_model." prefix most files carry, CLIP-G without, T5 without its tied copy
    save_file({"text_model." + k.removeprefix("text_model."): v.contiguous()
               for k, v in parts["text_encoder"].state_dict().items()}, str(tmp_path / "clip_l.safetensors"))
    save_file(parts["text_encoder_2"].state_dict(), str(tmp_path / "clip_g.safetensors"))
    t5 = {k: v for k, v in parts["text_encoder_3"].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(tmp_path / "t5xxl.safetensors"))
    parts["vae"].save_pretrained(str(tmp_path / "vae"))
    ref = sd3_bundle(parts, torch.device("cpu"), torch.float32, "ref")
    cfg = ModelConfig(base_model=str(tmp_path / "sd35.safetensors"), clip_l=str(tmp_path / "clip_l.safetensors"),
                      clip_g=str(tmp_path / "clip_g.safetensors"), t5xxl=str(tmp_path / "t5xxl.safetensors"),
                      vae=str(tmp_path / "vae"), t5_tokenizer=str(tok_dir), device="cpu", weight_dtype="fp32")
    loaded = load_bundle(cfg, config_folder=config)
    assert loaded.arch == "sd3" and loaded.extras["variant"] == variant and loaded.model_hash
    assert same_outputs(ref, loaded)


def test_an_all_in_one_file_brings_its_text_encoders(tmp_path: Path, tok_dir: Path) -> None:
    from safetensors.torch import save_file

    from lora_trainer.config import ModelConfig
    from lora_trainer.families.sd3 import sd3_bundle
    from lora_trainer.models.loaders import load_bundle
    from tests.family_flow_helpers import same_outputs, sd3_original_state_dict, write_config_folder

    parts = _parts(tok_dir)
    config = write_config_folder(parts, tmp_path / "config")
    sd = sd3_original_state_dict(parts["transformer"])
    for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")):
        sd.update({f"text_encoders.{name}.transformer.{k}": v.contiguous() for k, v in parts[sub].state_dict().items()
                   if k != "encoder.embed_tokens.weight"})
    save_file(sd, str(tmp_path / "sd35_all.safetensors"))
    parts["vae"].save_pretrained(str(tmp_path / "vae"))
    ref = sd3_bundle(parts, torch.device("cpu"), torch.float32, "ref")
    cfg = ModelConfig(base_model=str(tmp_path / "sd35_all.safetensors"), vae=str(tmp_path / "vae"),
                      t5_tokenizer=str(tok_dir), device="cpu", weight_dtype="fp32")
    assert same_outputs(ref, load_bundle(cfg, config_folder=config))


def test_a_missing_part_is_one_line_naming_its_field_before_any_conversion(tmp_path: Path, tok_dir: Path) -> None:
    from safetensors.torch import save_file

    from lora_trainer.config import ModelConfig
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.models.loaders import load_bundle

    # only the detection key: a conversion would fail with another message
    save_file({"joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "clip.safetensors").write_bytes(b"")
    base = dict(base_model=str(tmp_path / "m.safetensors"), device="cpu")
    cases = [({}, "model.clip_l is not set and the checkpoint does not carry it"),
             ({"clip_l": str(tmp_path / "clip.safetensors"), "clip_g": str(tmp_path / "nope")}, "model.clip_g: "),
             ({"clip_l": str(tmp_path / "clip.safetensors"), "clip_g": str(tmp_path / "clip.safetensors"),
               "t5xxl": str(tmp_path / "clip.safetensors"), "vae": str(tmp_path / "clip.safetensors")},
              "model.t5_tokenizer is not set"),
             ({"clip_l": str(tmp_path / "clip.safetensors"), "clip_g": str(tmp_path / "clip.safetensors"),
               "t5xxl": str(tmp_path / "clip.safetensors"), "vae": str(tmp_path / "clip.safetensors"),
               "t5_tokenizer": str(tmp_path)}, "model.t5_tokenizer: .* has no tokenizer.json")]
    for values, message in cases:
        with pytest.raises(ModelLoadError, match=message) as err:
            load_bundle(ModelConfig(**base, **values))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["flux1", "sd3"])
def test_memory_figures_match_the_packaged_full_size_configs(name: str) -> None:
    from diffusers import AutoencoderKL
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    fam = get_family(name)
    for variant, count in fam.denoiser_params.items():
        assert sum(p.numel() for p in fam.meta_denoiser(variant).parameters()) == count, variant
    folder = fam.config_folder(next(iter(fam.denoiser_params)))
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
               "T5EncoderModel": T5EncoderModel}
    with torch.device("meta"):
        te = 0
        for sub in fam.folder_parts():
            if sub.startswith("text_encoder"):
                config = AutoConfig.from_pretrained(str(folder / sub))
                te += sum(p.numel() for p in classes[config.architectures[0]](config).parameters())
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    assert te == fam.text_encoder_params
    assert sum(p.numel() for p in vae.parameters()) == fam.vae_params


def test_fp8_and_nf4_shrink_the_denoiser_weights() -> None:
    fam = get_family("flux1")
    bf16, fp8, nf4 = (fam.denoiser_weight_bytes("dev", d) for d in ("bf16", "fp8", "nf4"))
    assert bf16 == 2 * fam.denoiser_params["dev"]
    assert 0.5 * bf16 < fp8 + 0.02 * bf16 and fp8 < 0.55 * bf16  # nearly every weight is a block Linear
    assert nf4 < 0.32 * bf16


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_odd_latent_sides_are_a_clear_error(tok_dir: Path, tmp_path: Path, family: str) -> None:
    from lora_trainer.config import build_config
    from lora_trainer.errors import ConfigError

    b = build_bundle(family, "schnell" if family == "flux1" else "medium", tok_dir)
    cond = b.encode_text(["a cat"])
    with pytest.raises(ConfigError, match="a 72x64 image does not cut into .* 2x2 latent patches"):
        b.predict(torch.randn(1, 16, 8, 9), torch.tensor([0.5]), cond, None)
    with pytest.raises(ConfigError, match="data.resolution: 72 must be a multiple of 16"):
        build_config({"data.train_data_dir": str(tmp_path), "model.arch": family, "data.resolution": 72})


def test_fp8_base_weights_train(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.families.flow_parts import block_linears

    b = build_bundle("sd3", "large", tok_dir, weight_dtype="fp8")
    layers = [b.unet.get_submodule(p) for p in block_linears(b.unet)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    before, after, result, _ = train_memorises(b, tmp_path, {})
    print(f"sd3-large fp8: eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.88 * before, (before, after)
    assert module_keys(result.lora_path) == expected_unet_keys("sd3", b)


def test_the_test_section_renders_a_lora(tmp_path: Path, tok_dir: Path) -> None:
    from tests.family_flow_helpers import check_test_render

    check_test_render("sd3", "medium", tok_dir, tmp_path, 7.0)
