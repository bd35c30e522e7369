"""FLUX.1 (dev, schnell) on tiny models built from config: objective, training, files."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.families import get_family
from lora_trainer.families.flow_lora import dit_lora_key
from lora_trainer.families.flow_parts import block_linear_targets
from lora_trainer.families.flow_tiny import build_bundle
from lora_trainer.families.flux import image_ids, pack_latents, unpack_latents
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


def test_packing_round_trips_and_ids_count_patches() -> None:
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    # token 0 is the top-left 2x2 patch of every channel, channel-major as FluxPipeline packs it
    assert torch.equal(packed[0, 0].view(16, 2, 2), x[0, :, :2, :2])
    ids = image_ids(6, 10, torch.device("cpu"), torch.float32)
    assert ids.shape == (15, 3) and ids[7].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_variant_sets_guidance_input_and_shift(tok_dir: Path, variant: str) -> None:
    b = build_bundle("flux1", variant, tok_dir)
    spec = b.objective_spec
    assert b.arch == "flux1" and b.extras["variant"] == variant and b.latent_channels == 16
    assert b.prediction_type == "flow" and b.alphas_cumprod.numel() == 0
    assert spec.kind == "flow" and not spec.cfg_sampling
    assert spec.guidance_input == spec.resolution_shift == (variant == "dev")
    assert set(b.trainable_roots()) == {"unet", "te1"}  # T5 is never trained


def test_dev_predict_uses_the_guidance_value(tok_dir: Path) -> None:
    b = build_bundle("flux1", "dev", tok_dir)
    x = torch.randn(1, 16, 8, 8)
    cond = b.encode_text(["a cat"])
    with torch.no_grad():
        low = b.predict(x, torch.tensor([0.5]), {**cond, "guidance": torch.tensor([1.0])}, None)
        high = b.predict(x, torch.tensor([0.5]), {**cond, "guidance": torch.tensor([4.0])}, None)
    assert low.shape == x.shape and not torch.allclose(low, high)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_training_memorises_one_image_caches_text_and_round_trips(tmp_path: Path, tok_dir: Path,
                                                                 variant: str) -> None:
    b = build_bundle("flux1", variant, tok_dir)
    t5_calls = count_calls(b.text_encoders[1].module)
    extra = {"guidance": torch.tensor([3.5])} if variant == "dev" else {}
    before, after, result, host = train_memorises(b, tmp_path, extra)
    print(f"flux1-{variant}: eval loss before {before:.4f} after {after:.4f}; "
          f"final training loss {result.final_loss:.4f}")
    assert after < 0.88 * before, (before, after)
    kinds = [e.kind for e in host.events]
    assert "sample" in kinds
    assert any(e.kind == "status" and "caching text embeddings" in (e.message or "") for e in host.events)
    # T5 ran once for the cache (captions and the sample prompt), never in the loop or the
    # sample; twice more for eval_loss before and after
    assert t5_calls[0] == 1 + 2
    assert module_keys(result.lora_path) == expected_unet_keys("flux1", b)
    assert_family_metadata(result.lora_path, "flux1", variant)


def test_targets_are_block_attention_and_feed_forward(tok_dir: Path) -> None:
    b = build_bundle("flux1", "dev", tok_dir)
    keys = expected_unet_keys("flux1", b)
    for path in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
                 "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.net.2",
                 "transformer_blocks.0.ff_context.net.0.proj", "single_transformer_blocks.0.attn.to_v",
                 "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"):
        assert dit_lora_key("flux1", "unet", path).partition("@")[0] in keys, path
    assert not any(".norm" in p for p in block_linear_targets(b.unet))  # adaLN modulation is left out, as kohya does
    assert get_family("flux1").default_targets("te2", b.text_encoders[1].module, "hf_t5") == []


def test_text_encoder_lora_goes_on_clip_only(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import TinyHost, make_data, tiny_config

    b = build_bundle("flux1", "schnell", tok_dir)
    cfg = tiny_config(make_data(tmp_path / "d", n=2), tmp_path / "out", **{"network.train_text_encoder": True})
    result = Trainer(cfg, host=TinyHost(bundle=b)).run()
    from lora_trainer.lora.targets import default_text_targets

    clip = b.text_encoders[0].module
    te1 = {dit_lora_key("flux1", "te1", p) for p in default_text_targets(clip, "hf_clip")}
    assert te1 and module_keys(result.lora_path) == expected_unet_keys("flux1", b) | te1


def test_detection_by_keys_with_or_without_prefix() -> None:
    from lora_trainer.families import detect_state_dict

    for key in ("double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"):
        assert detect_state_dict({key: torch.zeros(1)}).name == "flux1"


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_diffusers_folder_loads_offline(tmp_path: Path, tok_dir: Path, variant: str) -> None:
    from lora_trainer.config import ModelConfig
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.families.flux import flux_bundle
    from lora_trainer.models.loaders import load_bundle
    from tests.family_flow_helpers import same_outputs, save_pipeline

    parts = build_components("flux1", variant, tok_dir)
    parts.pop("t5_max_length")  # the loader uses the pipeline's 512 / 256 tokens
    folder = save_pipeline("flux1", parts, tmp_path / "flux")
    ref = flux_bundle(parts, torch.device("cpu"), torch.float32, "ref")
    loaded = load_bundle(ModelConfig(base_model=str(folder), device="cpu", weight_dtype="fp32"))
    assert loaded.arch == "flux1" and loaded.extras["variant"] == variant
    assert loaded.objective_spec.guidance_input == (variant == "dev")
    assert same_outputs(ref, loaded, {"guidance": torch.tensor([3.5])})


def test_a_diffusers_folder_part_can_be_replaced_and_a_missing_t5_tokenizer_is_one_line(
        tmp_path: Path, tok_dir: Path) -> None:
    import shutil

    from lora_trainer.config import ModelConfig
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.models.loaders import load_bundle
    from tests.family_flow_helpers import save_pipeline

    folder = save_pipeline("flux1", build_components("flux1", "schnell", tok_dir), tmp_path / "flux")
    other = build_components("flux1", "schnell", tok_dir, seed=1)["text_encoder"]
    other.save_pretrained(str(tmp_path / "clip_l"))
    loaded = load_bundle(ModelConfig(base_model=str(folder), clip_l=str(tmp_path / "clip_l"), device="cpu"))
    ours, theirs = loaded.text_encoders[0].module.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    shutil.rmtree(folder / "tokenizer_2")
    with pytest.raises(ModelLoadError, match="model.t5_tokenizer: .*tokenizer_2 has no tokenizer.json") as err:
        load_bundle(ModelConfig(base_model=str(folder), device="cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_single_file_parts_are_checked_before_any_conversion(tmp_path: Path, variant: str) -> None:
    from safetensors.torch import save_file

    from lora_trainer.config import ModelConfig
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.models.loaders import load_bundle

    keys = ["double_blocks.0.img_attn.qkv.weight"] + (["guidance_in.in_layer.weight"] if variant == "dev" else [])
    save_file({k: torch.zeros(3, 1) for k in keys}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ModelLoadError, match="model.clip_l is not set and the checkpoint does not carry it") as err:
        load_bundle(ModelConfig(base_model=str(tmp_path / "flux.safetensors"), device="cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_packaged_config_matches_the_bfl_layout_diffusers_converts(variant: str) -> None:
    """diffusers' BFL converter only runs at the real width (3072), so it is checked on the meta
    device: a BFL-layout state dict of the packaged config converts to exactly the keys and
    shapes of the model that config builds, and the parameter count is the family's figure."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    from tests.family_flow_helpers import flux_original_state_dict

    fam = get_family("flux1")
    model = fam.meta_denoiser(variant)
    assert sum(p.numel() for p in model.parameters()) == fam.denoiser_params[variant]
    sd = model.state_dict()
    bfl = flux_original_state_dict(sd, model.config.num_layers, model.config.num_single_layers,
                                   "model.diffusion_model.")
    assert fam.matches_state_dict(set(bfl), bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert sorted(back) == sorted(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_fp8_base_weights_train(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.families.flow_parts import Fp8Linear, block_linears

    b = build_bundle("flux1", "dev", tok_dir, weight_dtype="fp8")
    paths = block_linears(b.unet)
    layers = [b.unet.get_submodule(p) for p in paths]
    assert layers and all(isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in layers)
    full = build_bundle("flux1", "dev", tok_dir)
    x, cond = torch.randn(1, 16, 8, 8), full.encode_text(["a red circle"])
    cond["guidance"] = torch.tensor([3.5])
    with torch.no_grad():  # fp8 storage is close to, not equal to, the full-precision model
        a, f = b.predict(x, torch.tensor([0.5]), cond, None), full.predict(x, torch.tensor([0.5]), cond, None)
    assert not torch.equal(a, f) and torch.allclose(a, f, atol=0.1)
    t5 = b.text_encoders[1].module  # T5 is stored in fp8 too, but its feed-forward output layer
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    before, after, result, _ = train_memorises(b, tmp_path, {"guidance": torch.tensor([3.5])})
    print(f"flux1-dev fp8: eval loss before {before:.4f} after {after:.4f}")
    assert after < 0.88 * before, (before, after)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in layers)  # the base stays fp8
    assert module_keys(result.lora_path) == expected_unet_keys("flux1", b)


def test_nf4_without_bitsandbytes_is_one_line(tok_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from lora_trainer.errors import ModelLoadError

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ModelLoadError, match="nf4 needs bitsandbytes; pip install bitsandbytes") as err:
        build_bundle("flux1", "schnell", tok_dir, weight_dtype="nf4")
    assert "\n" not in str(err.value)


def test_quantized_weights_are_refused_for_stable_diffusion(tmp_path: Path) -> None:
    from lora_trainer.config import ModelConfig
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.models.loaders import load_bundle

    with pytest.raises(ModelLoadError, match="model.weight_dtype fp8: Stable Diffusion 1.x models load in"):
        load_bundle(ModelConfig(base_model="demo", device="cpu", weight_dtype="fp8"))


def test_standalone_host_trains_a_diffusers_folder_and_reloads_for_fp8(tmp_path: Path, tok_dir: Path) -> None:
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.hosts.standalone import StandaloneHost
    from lora_trainer.train.trainer import Trainer
    from tests.family_flow_helpers import save_pipeline
    from tests.train_helpers import make_data, tiny_config

    folder = save_pipeline("flux1", build_components("flux1", "schnell", tok_dir), tmp_path / "flux")
    data = make_data(tmp_path / "d", n=2)
    host = StandaloneHost()
    cfg = tiny_config(data, tmp_path / "out", **{"model.base_model": str(folder)})
    result = Trainer(cfg, host=host).run()
    assert result.steps == 2 and host._last_bundle is not None and host._last_bundle.arch == "flux1"
    assert module_keys(result.lora_path) == expected_unet_keys("flux1", host._last_bundle)
    first = host._last_bundle
    Trainer(tiny_config(data, tmp_path / "out8", **{"model.base_model": str(folder), "model.weight_dtype": "fp8"}),
            host=host).run()
    assert host._last_bundle is not first  # fp8 storage is another model, not the cached one
    assert host._last_bundle.unet.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn  # LoRA removed


def test_config_flow_settings_take_kohyas_names_and_reach_the_objective(tmp_path: Path) -> None:
    from lora_trainer.config import build_config
    from lora_trainer.errors import ConfigError
    from lora_trainer.families.flux import DEV_OBJECTIVE, SCHNELL_OBJECTIVE
    from lora_trainer.train.objectives import configured_spec

    def loop(**values: object):  # noqa: ANN202
        return build_config({"data.train_data_dir": str(tmp_path), **values}).train

    assert configured_spec(DEV_OBJECTIVE, loop()) == DEV_OBJECTIVE
    shifted = configured_spec(DEV_OBJECTIVE, loop(timestep_sampling="shift"))
    assert (shifted.sampling, shifted.resolution_shift, shifted.shift) == ("sigmoid", False, 3.0)
    fixed = configured_spec(DEV_OBJECTIVE, loop(discrete_flow_shift=3.1582, guidance_scale=1.0))
    assert (fixed.shift, fixed.resolution_shift, fixed.train_guidance) == (3.1582, False, 1.0)
    flux_shift = configured_spec(SCHNELL_OBJECTIVE, loop(timestep_sampling="flux_shift"))
    assert flux_shift.resolution_shift and flux_shift.sampling == "sigmoid"
    assert configured_spec(SCHNELL_OBJECTIVE, loop(timestep_sampling="uniform")).sampling == "uniform"
    # kohya's "sigma": drawn by weighting_scheme, then its fixed shift (3 unless discrete_flow_shift says)
    sigma = configured_spec(DEV_OBJECTIVE, loop(timestep_sampling="sigma", weighting_scheme="none"))
    assert (sigma.sampling, sigma.resolution_shift, sigma.shift) == ("uniform", False, 3.0)
    sigma = configured_spec(DEV_OBJECTIVE, loop(timestep_sampling="sigma", weighting_scheme="logit_normal",
                                                discrete_flow_shift=1.5, logit_mean=0.5, logit_std=2.0))
    assert (sigma.sampling, sigma.shift, sigma.logit_mean, sigma.logit_std) == ("logit_normal", 1.5, 0.5, 2.0)
    assert configured_spec(DEV_OBJECTIVE, loop(sigmoid_scale=2.5)).sigmoid_scale == 2.5
    sd1 = get_family("sd1").objective
    with pytest.raises(ConfigError, match="train.discrete_flow_shift: applies to rectified-flow models"):
        configured_spec(sd1, loop(discrete_flow_shift=3.0))
    with pytest.raises(ConfigError, match="train.sigmoid_scale: applies to rectified-flow models"):
        configured_spec(sd1, loop(sigmoid_scale=2.0))
    with pytest.raises(ConfigError, match="train.weighting_scheme: 'mode' is not allowed"):
        loop(weighting_scheme="mode")
    with pytest.raises(ConfigError, match="train.min_snr_gamma"):
        build_config({"data.train_data_dir": str(tmp_path), "model.arch": "flux1", "train.min_snr_gamma": 5})


def test_sigmoid_scale_spreads_the_drawn_sigmas() -> None:
    from lora_trainer.families.flux import SCHNELL_OBJECTIVE
    from lora_trainer.train.objectives import FlowObjective

    def spread(scale: float) -> float:
        obj = FlowObjective(replace(SCHNELL_OBJECTIVE, sigmoid_scale=scale), torch.device("cpu"))
        return float(obj.sample_sigmas(4000, torch.Generator().manual_seed(0), torch.zeros(1, 16, 8, 8)).std())

    assert spread(3.0) > spread(1.0) + 0.05


def test_a_lora_scripts_flux_form_export_loads(tmp_path: Path) -> None:
    """lora-scripts' Flux form with its defaults: fp8_base is model.weight_dtype fp8; its flow keys
    reach the settings; the T5 ones it cannot honour are named, not refused."""
    from lora_trainer.config import load_config

    f = tmp_path / "flux.toml"
    f.write_text('model_train_type = "flux-lora"\nmodel_type = "flux"\nfp8_base = true\nsdpa = true\n'
                 'timestep_sampling = "sigmoid"\nsigmoid_scale = 1.0\nmodel_prediction_type = "raw"\n'
                 'discrete_flow_shift = 1.0\nguidance_scale = 1.0\napply_t5_attn_mask = true\n'
                 'train_t5xxl = false\nfull_bf16 = true\nmixed_precision = "bf16"\n', encoding="utf-8")
    cfg = load_config(f)
    t = cfg.train
    assert (cfg.model.weight_dtype, t.timestep_sampling, t.sigmoid_scale, t.discrete_flow_shift, t.guidance_scale) \
        == ("fp8", "sigmoid", 1.0, 1.0, 1.0)
    for bad, said in [('model_type = "chroma"', "model_type: 'chroma' is not supported here"),
                      ('model_train_type = "sdxl-lora"\nfp8_base = true', "fp8_base: SD1, SD2 and SDXL train with "
                                                                          "their weights in fp16/bf16 here"),
                      ("train_t5xxl = true", "train_t5xxl: True is not supported here"),
                      ("split_mode = true", "split_mode: True is not supported here")]:
        f.write_text(bad + "\n", encoding="utf-8")
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(f)


def test_training_gives_dev_its_guidance_value(tok_dir: Path) -> None:
    from lora_trainer.train.objectives import FlowObjective, configured_spec
    from tests.train_helpers import tiny_config

    b = build_bundle("flux1", "dev", tok_dir)
    cfg = tiny_config(Path("."), Path("out"), **{"train.guidance_scale": 2.5})
    obj = FlowObjective(configured_spec(b.objective_spec, cfg.train), torch.device("cpu"))
    step = obj.step_inputs(torch.zeros(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.Generator().manual_seed(0))
    assert torch.equal(step.cond["guidance"], torch.full((2,), 2.5))
    schnell = FlowObjective(build_bundle("flux1", "schnell", tok_dir).objective_spec, torch.device("cpu"))
    assert schnell.step_inputs(torch.zeros(1, 16, 8, 8), torch.randn(1, 16, 8, 8), torch.Generator()).cond == {}


def test_t5_runs_in_bf16_when_the_model_is_fp16(tok_dir: Path) -> None:
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.families.flux import flux_bundle

    b = flux_bundle(build_components("flux1", "schnell", tok_dir), torch.device("cpu"), torch.float16, "half")
    assert next(b.text_encoders[1].module.parameters()).dtype == torch.bfloat16  # T5 v1.1 overflows in fp16
    assert next(b.unet.parameters()).dtype == next(b.text_encoders[0].module.parameters()).dtype == torch.float16
    with torch.no_grad():
        cond = b.encode_text(["a red circle"])
        out = b.predict(torch.randn(1, 16, 8, 8, dtype=torch.float16), torch.tensor([0.5]), cond, None)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_dora_on_quantized_weights_is_refused_before_loading(tmp_path: Path) -> None:
    from lora_trainer.config import build_config
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="network.type dora needs the base weights in full precision"):
        build_config({"data.train_data_dir": str(tmp_path), "network.type": "dora", "model.weight_dtype": "fp8"})


def test_fp8_weights_are_stored_before_the_model_moves_to_the_device(tok_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A card must never hold the transformer (or T5) at full width: quantize where the weights
    # were loaded, then move. The meta device stands in for the card here.
    from lora_trainer.families import flow_parts
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.families.flux import flux_bundle

    seen: list[str] = []
    store = flow_parts.store_fp8

    def spy(module, compute_dtype, paths=None):  # noqa: ANN001, ANN202
        seen.append(next(module.parameters()).device.type)
        return store(module, compute_dtype, paths)

    monkeypatch.setattr(flow_parts, "store_fp8", spy)
    b = flux_bundle(build_components("flux1", "dev", tok_dir), torch.device("meta"), torch.float32, "t", "fp8")
    assert seen == ["cpu", "cpu"]  # transformer, then T5
    linear = b.unet.get_submodule(block_linear_targets(b.unet)[0])
    assert linear.weight.device.type == "meta" and linear.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("weight_dtype", ["auto", "fp8"])
def test_the_standalone_load_leaves_the_transformer_off_the_card_until_the_caches_are_filled(
        tok_dir: Path, weight_dtype: str) -> None:
    # T5-XXL and the transformer never share the card: the loader keeps the transformer (fp8
    # already, when asked) in the host's memory and the trainer places it after caching. The
    # meta device stands in for the card.
    from lora_trainer.families.flow_tiny import build_components
    from lora_trainer.families.flux import flux_bundle
    from lora_trainer.families.sd3 import sd3_bundle
    from lora_trainer.models import placement

    meta = torch.device("meta")
    with placement.denoiser_placed_later():
        flux = flux_bundle(build_components("flux1", "dev", tok_dir), meta, torch.float32, "t", weight_dtype)
        sd3 = sd3_bundle(build_components("sd3", "medium", tok_dir), meta, torch.float32, "t", weight_dtype)
    for b in (flux, sd3):
        assert placement.device_of(b.unet).type == "cpu" and b.extras[placement.DENOISER_DEVICE] == meta
        assert all(placement.device_of(p.module) == meta for p in b.text_encoders) and placement.device_of(b.vae) == meta
        linear = b.unet.get_submodule(block_linear_targets(b.unet)[0])
        assert linear.weight.dtype == (torch.float8_e4m3fn if weight_dtype == "fp8" else torch.float32)


def test_the_test_section_renders_a_lora_at_dev_guidance(tmp_path: Path, tok_dir: Path) -> None:
    from tests.family_flow_helpers import check_test_render

    check_test_render("flux1", "dev", tok_dir, tmp_path, 3.5)


def test_alpha_mask_weights_the_flow_loss_too(tmp_path: Path, tok_dir: Path) -> None:
    """Flux.1's 16-channel latents take the (B, 1, h, w) alpha mask like SD's: a run on
    transparent PNGs trains, to another LoRA than the same run's without alpha_mask."""
    from lora_trainer.train.trainer import Trainer
    from tests.train_helpers import TinyHost, lora_tensors, make_transparent_data, tiny_config

    data = make_transparent_data(tmp_path / "data", n=2)
    host = TinyHost(bundle=build_bundle("flux1", "dev", tok_dir))
    loras = []
    for name, on in (("a", True), ("b", False)):
        cfg = tiny_config(data, tmp_path / name, **{"train.max_train_steps": 2, "train.batch_size": 2,
                                                    "output.save_precision": "fp32", "data.alpha_mask": on})
        result = Trainer(cfg, host=host).run()
        assert result.steps == 2 and result.final_loss is not None
        loras.append(lora_tensors(result.lora_path))
    assert loras[0].keys() == loras[1].keys()
    assert any(not torch.allclose(loras[0][k], loras[1][k]) for k in loras[0])
