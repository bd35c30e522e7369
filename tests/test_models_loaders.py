"""load_bundle: demo, diffusers folder, single-file checkpoints in the WebUI's original key layout.

The single-file tests write a tiny checkpoint from the model classes the WebUI itself runs (the
LDM UNet and autoencoder from stable-diffusion-sdkit, an open_clip text tower for SD2), then
check that loading it through the packaged-config path reproduces those models' outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer.config import ModelConfig
from lora_trainer.errors import ModelLoadError
from lora_trainer.families import get_family, sd_detect
from lora_trainer.models import checkpoint as ckpt
from lora_trainer.models import tiny
from lora_trainer.models.loaders import load_bundle

CAPTIONS = ["a photo of a cat", "a red car"]



def _predict(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return bundle.predict(latents, torch.tensor([3, 700]), bundle.encode_text(CAPTIONS), None)


# --- demo and diffusers folders -------------------------------------------------------------


def test_demo_bundle_is_deterministic():
    a = load_bundle(ModelConfig(base_model="demo"), "cpu", torch.float32)
    b = load_bundle(ModelConfig(base_model="demo"), "cpu", torch.float32)
    assert a.arch == "sd1" and a.default_resolution == 64 and a.name == "demo"
    assert torch.equal(_predict(a), _predict(b))
    sd_a, sd_b = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_diffusers_folder_round_trip(tmp_path, arch):
    pipe = tiny.build_pipeline(arch, prediction_type="v_prediction" if arch == "sd2" else "epsilon")
    pipe.save_pretrained(tmp_path / "model")
    bundle = load_bundle(ModelConfig(base_model=str(tmp_path / "model")), "cpu", torch.float32)
    assert bundle.arch == arch and bundle.name == "model"
    assert bundle.prediction_type == ("v_prediction" if arch == "sd2" else "epsilon")
    from lora_trainer.models.setups import bundle_from_diffusers

    reference = bundle_from_diffusers(dict(pipe.components), arch)
    assert torch.equal(_predict(bundle), _predict(reference))
    assert bundle.model_hash is None


def test_missing_and_wrong_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_bundle(ModelConfig(base_model=str(tmp_path / "nope.safetensors")), "cpu", torch.float32)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_bundle(ModelConfig(base_model=str(tmp_path)), "cpu", torch.float32)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ModelLoadError, match="no Stable Diffusion UNet"):
        load_bundle(ModelConfig(base_model=str(lora)), "cpu", torch.float32)


def test_pickle_refused_without_opt_in(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, path)
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        load_bundle(ModelConfig(base_model=str(path)), "cpu", torch.float32)
    # Opted in, the pickle is read (and then found not to be a model).
    with pytest.raises(ModelLoadError, match="no Stable Diffusion UNet"):
        load_bundle(ModelConfig(base_model=str(path), allow_pickle=True), "cpu", torch.float32)


# --- family detection ----------------------------------------------------------------------


def _keys(*names, unet_in=4):
    sd = {sd_detect.UNET_IN_KEY: torch.empty(32, unet_in, 3, 3)}
    sd.update({n: torch.empty(1) for n in names})
    return sd


@pytest.mark.parametrize("names,arch", [
    ((sd_detect.SD1_TE_KEY,), "sd1"),
    ((sd_detect.SD2_TE_KEY,), "sd2"),
    ((sd_detect.SDXL_TE1_KEY, sd_detect.SDXL_TE2_KEY), "sdxl"),
])
def test_detect_arch(names, arch):
    assert sd_detect.detect_arch(_keys(*names)) == arch


def test_detect_arch_rejects_inpainting_and_refiner():
    with pytest.raises(ModelLoadError, match="inpainting"):
        sd_detect.detect_arch(_keys(sd_detect.SD1_TE_KEY, unet_in=9))
    with pytest.raises(ModelLoadError, match="refiner"):
        sd_detect.detect_arch(_keys("conditioner.embedders.0.model.token_embedding.weight"))


def test_sd2_prediction_type_from_yaml(tmp_path):
    model = tmp_path / "m.safetensors"
    assert sd_detect.sd2_prediction_type(model, "auto") == "epsilon"
    assert sd_detect.sd2_prediction_type(model, "v_prediction") == "v_prediction"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    assert sd_detect.sd2_prediction_type(model, "auto") == "v_prediction"


def test_file_hashes(tmp_path):
    import hashlib

    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    full, legacy = ckpt.file_hashes(path)
    assert full == hashlib.sha256(data).hexdigest()
    assert legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert ckpt.file_hashes(path) == (full, legacy)  # from the cache


def test_packaged_configs_are_complete():
    for name in ("sd1", "sd2", "sd2_v", "sdxl"):
        folder = ckpt.prepared_config_folder(name)
        index = json.loads((folder / "model_index.json").read_text())
        for sub in ("unet", "vae", "text_encoder", "scheduler", "tokenizer"):
            assert sub in index and (folder / sub).is_dir()
        assert (folder / "tokenizer" / "vocab.json").is_file()
        assert not list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    sd2_te = json.loads((ckpt.CONFIGS_DIR / "sd2" / "text_encoder" / "config.json").read_text())
    assert sd2_te["num_hidden_layers"] == 23  # OpenCLIP-H minus its last block (penultimate layer)


# --- single file, from the WebUI's own model classes ----------------------------------------


def _tiny_config_folder(root: Path, arch: str, te_cfg: dict) -> Path:
    """A config-only folder for the tiny models: same layout as the packaged ones."""
    sched = "DDIMScheduler" if arch == "sd2" else "PNDMScheduler"
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", sched],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    files = {
        "model_index.json": index,
        "unet/config.json": {"_class_name": "UNet2DConditionModel", **tiny.unet_config(arch)},
        "vae/config.json": {"_class_name": "AutoencoderKL", **tiny.vae_config(arch)},
        "text_encoder/config.json": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **te_cfg},
        "scheduler/scheduler_config.json": {"_class_name": sched, **tiny.SCHEDULER_KWARGS},
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data))
    return root


def _ldm_unet(arch: str):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    heads = dict(num_heads=8) if arch == "sd1" else dict(num_head_channels=16, use_linear_in_transformer=True)
    return UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2,
                     attention_resolutions=[4, 2, 1], channel_mult=[1, 2, 4, 4], use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32, legacy=False, **heads).eval()


def _ldm_vae():
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    dd = dict(double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    return torch.nn.ModuleDict({"encoder": Encoder(**dd), "decoder": Decoder(**dd),
                                "quant_conv": torch.nn.Conv2d(8, 8, 1), "post_quant_conv": torch.nn.Conv2d(4, 4, 1)})


def _prefixed(module, prefix):
    return {prefix + k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def sd1_checkpoint(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    root = tmp_path_factory.mktemp("sd1")
    unet, vae = _ldm_unet("sd1"), _ldm_vae()
    te = CLIPTextModel(CLIPTextConfig(**tiny.text_config("quick_gelu"))).eval()
    sd = {**_prefixed(unet, "model.diffusion_model."), **_prefixed(vae, "first_stage_model."),
          # WebUI checkpoints spell the CLIP keys with the text_model. level (transformers 4.x layout)
          **{"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v.contiguous()
             for k, v in te.state_dict().items()}}
    path = root / "tiny-sd1.safetensors"
    save_file(sd, str(path))
    folder = _tiny_config_folder(root / "config", "sd1", tiny.text_config("quick_gelu"))
    return path, folder, unet, vae, te


def test_single_file_sd1_matches_ldm_models(sd1_checkpoint):
    path, folder, unet, vae, te = sd1_checkpoint
    bundle = load_bundle(ModelConfig(base_model=str(path)), "cpu", torch.float32, config_folder=folder)
    assert bundle.arch == "sd1" and bundle.prediction_type == "epsilon" and bundle.name == "tiny-sd1"
    assert bundle.model_hash == ckpt.file_hashes(path)[0] and len(bundle.legacy_hash) == 8
    g = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([3, 700])
    with torch.no_grad():
        got = bundle.predict(latents, t, {"context": context}, None)
        want = unet(latents, t, context=context)
        # text encoder: same weights, same hidden states
        cond = bundle.encode_text(CAPTIONS)["context"]
        ids = bundle.extras["tokenizers"][0](CAPTIONS, padding="max_length", max_length=77,
                                             return_tensors="pt").input_ids
        assert torch.allclose(cond, te(ids).last_hidden_state, atol=1e-5)
        # VAE: the posterior mean equals the LDM encoder's
        px = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        mean_ldm = vae["quant_conv"](vae["encoder"](px))[:, :4]
        mean = bundle.vae.encode(px).latent_dist.mean
        assert torch.allclose(mean, mean_ldm, atol=1e-4)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_single_file_sd2_uses_open_clip_penultimate_layer(tmp_path):
    """SD2 checkpoints store OpenCLIP; the bundle must give what the WebUI computes from it."""
    import open_clip.transformer as oct

    torch.manual_seed(2)
    layers, width = 24, 32
    tt = oct.TextTransformer(context_length=77, vocab_size=49408, width=width, heads=4, layers=layers,
                             output_dim=32, act_layer=torch.nn.GELU).eval()
    unet, vae = _ldm_unet("sd2"), _ldm_vae()
    sd = {**_prefixed(unet, "model.diffusion_model."), **_prefixed(vae, "first_stage_model."),
          **_prefixed(tt, "cond_stage_model.model.")}
    path = tmp_path / "tiny-sd2.safetensors"
    save_file(sd, str(path))
    (tmp_path / "tiny-sd2.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    te_cfg = {**tiny.text_config("gelu"), "num_hidden_layers": layers - 1, "intermediate_size": 4 * width}
    folder = _tiny_config_folder(tmp_path / "config", "sd2", te_cfg)
    bundle = load_bundle(ModelConfig(base_model=str(path)), "cpu", torch.float32, config_folder=folder)
    assert bundle.arch == "sd2" and bundle.prediction_type == "v_prediction"

    ids = bundle.extras["tokenizers"][0](CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, -1] == 0  # SD2 pads with "!"
    with torch.no_grad():
        # What the WebUI's FrozenOpenCLIPEmbedder(layer="penultimate") does: all blocks but the last, then ln_final.
        x, mask = tt._embeds(ids)
        for block in tt.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        want = tt.ln_final(x)
        got = bundle.encode_text(CAPTIONS)["context"]
        g = torch.Generator().manual_seed(0)
        latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
        assert torch.allclose(bundle.predict(latents, t, {"context": got}, None), unet(latents, t, context=got),
                              atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_single_file_separate_vae(sd1_checkpoint, tmp_path):
    path, folder, _, _, _ = sd1_checkpoint
    torch.manual_seed(3)
    other = _ldm_vae()
    vae_file = tmp_path / "other.vae.safetensors"
    save_file(_prefixed(other, ""), str(vae_file))  # standalone VAE files carry the bare keys
    cfg = ModelConfig(base_model=str(path), vae=str(vae_file))
    bundle = load_bundle(cfg, "cpu", torch.float32, config_folder=folder)
    px = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        mean = bundle.vae.encode(px).latent_dist.mean
        assert torch.allclose(mean, other["quant_conv"](other["encoder"](px))[:, :4], atol=1e-4)


# Published parameter counts of the real models: a typo in a packaged config changes them.
REAL_SIZES = {
    ("sd1", "unet"): 859_520_964, ("sd2", "unet"): 865_910_724, ("sd2_v", "unet"): 865_910_724,
    ("sdxl", "unet"): 2_567_463_684, ("sd1", "vae"): 83_653_863, ("sdxl", "vae"): 83_653_863,
    ("sd1", "text_encoder"): 123_060_480, ("sdxl", "text_encoder"): 123_060_480,
    ("sd2", "text_encoder"): 340_387_840, ("sdxl", "text_encoder_2"): 694_659_840,
}


@pytest.mark.parametrize("name,part", sorted(REAL_SIZES))
def test_packaged_configs_describe_the_real_models(name, part):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = json.loads((ckpt.CONFIGS_DIR / name / part / "config.json").read_text())
    with init_empty_weights():  # shapes only, no memory
        if part == "unet":
            model = UNet2DConditionModel.from_config(cfg)
        elif part == "vae":
            model = AutoencoderKL.from_config(cfg)
        else:
            cls = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig(**cfg))
    assert sum(p.numel() for p in model.parameters()) == REAL_SIZES[name, part]


def test_single_file_sdxl_text_encoders_match_sgm_conditioning(tmp_path):
    """SDXL checkpoints store CLIP-L (transformers keys) and OpenCLIP-bigG; the bundle's conditioning
    must be what the WebUI's SGM embedders compute: both penultimate layers (no final norm) side by
    side, and bigG's projected final-norm EOS token as the pooled vector."""
    import open_clip.transformer as oct
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_trainer.models.loaders import text_encoders_from_state_dict

    torch.manual_seed(4)
    te1 = CLIPTextModel(CLIPTextConfig(**tiny.text_config("quick_gelu"))).eval()  # width 32
    big_g = oct.TextTransformer(context_length=77, vocab_size=49408, width=48, heads=4, layers=3, output_dim=48,
                                act_layer=torch.nn.GELU).eval()  # a different width, as in the real pair
    sd = {**{"conditioner.embedders.0.transformer.text_model." + k: v.contiguous()
             for k, v in te1.state_dict().items()},
          **_prefixed(big_g, "conditioner.embedders.1.model.")}
    assert sd_detect.detect_arch({**sd, sd_detect.UNET_IN_KEY: torch.empty(32, 4, 3, 3)}) == "sdxl"

    config = tmp_path / "config"
    te2_cfg = {**tiny.text_config("gelu", projection_dim=48), "hidden_size": 48, "intermediate_size": 192,
               "num_hidden_layers": 3}
    files = {"model_index.json": {"_class_name": "StableDiffusionXLPipeline",
                                  "text_encoder": ["transformers", "CLIPTextModel"],
                                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                                  "tokenizer": ["transformers", "CLIPTokenizer"],
                                  "tokenizer_2": ["transformers", "CLIPTokenizer"]},
             "text_encoder/config.json": {"model_type": "clip_text_model", **tiny.text_config("quick_gelu")},
             "text_encoder_2/config.json": {"model_type": "clip_text_model", **te2_cfg}}
    for rel, data in files.items():
        (config / rel).parent.mkdir(parents=True, exist_ok=True)
        (config / rel).write_text(json.dumps(data))
    folder = ckpt.prepared_config_folder("sdxl-tiny-te", config)
    parts = text_encoders_from_state_dict(sd, "sdxl", folder, torch.float32)
    encode = get_family("sdxl").make_encode_text([parts["text_encoder"], parts["text_encoder_2"]],
                                                [parts["tokenizer"], parts["tokenizer_2"]], torch.device("cpu"))
    ids1 = parts["tokenizer"](CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = parts["tokenizer_2"](CAPTIONS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids1[0, -1] == 49407 and ids2[0, -1] == 0  # CLIP-L pads with EOS, bigG with "!"
    with torch.no_grad():
        got = encode(CAPTIONS)
        want1 = te1(ids1, output_hidden_states=True).hidden_states[-2]
        x, mask = big_g._embeds(ids2)
        for block in big_g.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        want2 = x
        last = big_g.ln_final(big_g.transformer.resblocks[-1](x, attn_mask=mask))
        pooled = last[torch.arange(len(CAPTIONS)), ids2.argmax(dim=-1)] @ big_g.text_projection
    assert got["context"].shape == (2, 77, 80)
    assert torch.allclose(got["context"], torch.cat([want1, want2], dim=-1), atol=1e-5)
    assert torch.allclose(got["pooled"], pooled, atol=1e-5)
