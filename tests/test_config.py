from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_trainer.config import (
    ALIASES,
    TrainConfig,
    all_field_paths,
    build_config,
    example_yaml,
    flatten_user_dict,
    load_config,
    reference_markdown,
    sample_prompts_of,
)
from lora_trainer.errors import ConfigError

FLAT_KEYS = {
    "train_data_dir": ("data.train_data_dir", "imgs"),
    "metadata_path": ("data.metadata_path", "imgs/metadata.csv"),
    "base_model": ("model.base_model", "/models/sd15.safetensors"),
    "lora_rank": ("network.rank", 32),
    "network_dim": ("network.rank", 8),
    "lora_alpha": ("network.alpha", 4.0),
    "network_alpha": ("network.alpha", 2.0),
    "target_modules": ("network.target_modules", ["to_q", "to_v"]),
    "batch_size": ("train.batch_size", 4),
    "epochs": ("train.epochs", 3),
    "max_train_steps": ("train.max_train_steps", 100),
    "multires_noise_iterations": ("train.multires_noise_iterations", 6),
    "multires_noise_discount": ("train.multires_noise_discount", 0.5),
    "loraplus_lr_ratio": ("optim.loraplus_lr_ratio", 16.0),
    "lr_scheduler_power": ("optim.lr_scheduler_power", 2.0),
    "training_comment": ("output.training_comment", "30 photos of Rex"),
    "learning_rate": ("optim.learning_rate", 3e-4),
    "unet_lr": ("optim.unet_lr", 1e-4),
    "text_encoder_lr": ("optim.text_encoder_lr", 5e-5),
    "lr_scheduler": ("optim.lr_scheduler", "linear"),
    "lr_warmup_steps": ("optim.lr_warmup_steps", 10),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", 2),
    "mixed_precision": ("train.mixed_precision", "bf16"),
    "gradient_checkpointing": ("train.gradient_checkpointing", True),
    "resolution": ("data.resolution", 768),
    "seed": ("train.seed", 7),
    "output_dir": ("output.output_dir", "out"),
    "output_name": ("output.output_name", "cat"),
    "save_steps": ("train.save_steps", 50),
    "resume": ("train.resume", "latest"),
    "train_text_encoder": ("network.train_text_encoder", True),
}


@pytest.mark.parametrize("key", sorted(FLAT_KEYS))
def test_flat_alias_fills_field(tmp_path: Path, key: str) -> None:
    path, value = FLAT_KEYS[key]
    f = tmp_path / "c.yaml"
    import yaml

    f.write_text(yaml.safe_dump({key: value}))
    cfg = load_config(f)
    assert cfg.get(path) == value


def test_what_shapes_ddpm_training_is_refused_for_a_flow_model() -> None:
    for key, said in [("train.multires_noise_iterations=6", "pyramid noise is for DDPM models"),
                      ("train.min_snr_gamma=5", "Min-SNR weighting is for DDPM models"),
                      ("debiased_estimation_loss=true", "the debiased estimation loss is for DDPM models"),
                      ("min_timestep=100", "a timestep range is for DDPM models")]:
        with pytest.raises(ConfigError, match=said):
            load_config(None, ["model.arch=flux1", "data.resolution=512", key])
    with pytest.raises(ConfigError, match="must be a multiple of 16 for sd3"):
        load_config(None, ["model.arch=sd3", "data.resolution=520"])
    assert load_config(None, ["model.arch=sdxl", "multires_noise_iterations=6"]).train.multires_noise_iterations == 6
    for values in (["min_timestep=500", "max_timestep=500"], ["max_timestep=1001"], ["min_timestep=-1"]):
        with pytest.raises(ConfigError, match="must keep 0 <= min < max <= 1000"):
            load_config(None, values)


def test_every_alias_points_at_a_field() -> None:
    assert set(ALIASES.values()) <= set(all_field_paths())


def test_nested_sections_and_set_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("network:\n  rank: 4\n  alpha: 2\noptim:\n  lr_scheduler: constant\n")
    cfg = load_config(f, ["network.rank=12", "lora_alpha=6", "train.max_train_steps=5"])
    assert (cfg.network.rank, cfg.network.alpha, cfg.optim.lr_scheduler) == (12, 6.0, "constant")
    assert cfg.train.max_train_steps == 5


def test_string_values_are_coerced() -> None:
    cfg = build_config({"network.rank": "16", "train.gradient_checkpointing": "yes",
                        "optim.learning_rate": "1e-4", "network.target_modules": "to_q, to_k"})
    assert cfg.network.rank == 16 and cfg.train.gradient_checkpointing is True
    assert cfg.optim.learning_rate == 1e-4 and cfg.network.target_modules == ["to_q", "to_k"]


@pytest.mark.parametrize("overrides, fragment", [
    (["lora_rnak=4"], "did you mean 'lora_rank'"),
    (["network.rnak=4"], "did you mean 'rank'"),
    (["network.rank=abc"], "network.rank: 'abc' is not valid; expected an integer"),
    (["network.rank=0"], "network.rank: 0 must be at least 1"),
    (["optim.lr_scheduler=cosin"], "did you mean 'cosine'"),
    (["train.mixed_precision=fp8"], "expected one of 'auto', 'no', 'fp16', 'bf16'"),
    (["optim.learning_rate=-1"], "optim.learning_rate: -1.0 must be above 0"),
    (["data.resolution=500"], "multiple of 8"),
    (["data.caption_dropout=2"], "data.caption_dropout"),
    (["train.gradient_checkpointing=maybe"], "expected true or false"),
    (["network.train_unet=false"], "enable at least one"),
    (["rank"], "expected key=value"),
])
def test_bad_values_name_key_and_allowed(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_yaml_key_and_bad_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train_data_dri: x\n")
    with pytest.raises(ConfigError, match="did you mean 'train_data_dir'"):
        load_config(f)
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:1: not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text,line", [
    ("lora_rank: 4\nsample_prompt: [a cat, 2\nseed: 3\nepochs: 2\n", 2),  # unclosed list: where it opened
    ("lora_rank: 4\nsample_prompt: \"a cat\nseed: 3\nepochs: 2\n", 2),  # unclosed quote, noticed at the end
    ("lora_rank: 4\nseed: 3\n  epochs: 2\n", 3),  # bad indentation: the line itself
    ("lora_rank: 4\n\tseed: 3\n", 2),  # a tab
])
def test_yaml_syntax_error_names_the_line_to_fix(tmp_path: Path, text: str, line: int) -> None:
    f = tmp_path / "my.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}:{line}: not valid YAML: ") and "\n" not in str(e.value)


def test_alias_and_field_for_same_setting_conflict(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lora_rank: 4\nnetwork_dim: 8\n")
    with pytest.raises(ConfigError, match="both set network.rank"):
        load_config(f)


def test_kohya_boolean_aliases() -> None:
    cfg = load_config(None, ["v_parameterization=true", "random_crop=true", "cache_latents_to_disk=true"])
    assert cfg.model.prediction_type == "v_prediction"
    assert cfg.data.crop == "random"
    assert cfg.data.cache_latents == "disk"


def test_example_yaml_round_trips(tmp_path: Path) -> None:
    text = example_yaml()
    assert "# LoRA rank (network_dim)." in text
    f = tmp_path / "example.yaml"
    f.write_text(text)
    assert load_config(f) == TrainConfig()


def test_reference_lists_every_field() -> None:
    ref = reference_markdown()
    for path in all_field_paths():
        assert f"`{path}`" in ref


def test_readme_config_reference_is_current() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = readme.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    end = readme.index("<!-- config-reference:end -->")
    assert readme[start:end] == reference_markdown(), (
        "README's config reference is stale: regenerate it with 'python -m lora_trainer config --reference'")


# A lora-scripts training config (its config/lora.toml, paths and values of this test's own).
LORA_SCRIPTS_TOML = """
[model_arguments]
v2 = false
v_parameterization = false
pretrained_model_name_or_path = "./sd-models/model.safetensors"

[dataset_arguments]
train_data_dir = "./train/aki"
reg_data_dir = ""
resolution = "512,512"
prior_loss_weight = 1

[additional_network_arguments]
network_dim = 32
network_alpha = 16
network_train_unet_only = false
network_train_text_encoder_only = false
network_module = "networks.lora"
network_args = []

[optimizer_arguments]
unet_lr = 1e-4
text_encoder_lr = 1e-5
optimizer_type = "AdamW8bit"
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_restart_cycles = 2

[training_arguments]
train_batch_size = 2
noise_offset = 0.0
keep_tokens = 0
min_bucket_reso = 256
max_bucket_reso = 1024
caption_extension = ".txt"
max_token_length = 225
seed = 1337
xformers = true
lowram = false
max_train_epochs = 10
clip_skip = 2
mixed_precision = "fp16"
enable_contrastive = false
negative_sampling_method = "Random-Noise"
noise_strength = 1.0
contrastive_weight = 0.05
contrastive_warmup_steps = 100

[sample_prompt_arguments]
sample_sampler = "euler_a"
sample_every_n_epochs = 5

[saving_arguments]
output_name = "aki"
save_every_n_epochs = 1
save_state = false
save_model_as = "safetensors"
output_dir = "./output"
logging_dir = "./logs"
log_prefix = ""
save_precision = "fp16"

[others]
cache_latents = true
shuffle_caption = true
enable_bucket = true
"""


def test_a_lora_scripts_toml_config_loads_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its tables are read as flat keys, its settings land in ours, and the keys that change
    nothing here are named in one warning, each with why, instead of stopping the run."""
    f = tmp_path / "lora.toml"
    f.write_text(LORA_SCRIPTS_TOML, encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        cfg = load_config(f)
    assert (cfg.model.base_model, cfg.model.prediction_type) == ("./sd-models/model.safetensors", "epsilon")
    assert (cfg.data.train_data_dir, cfg.data.resolution, cfg.data.min_bucket_reso, cfg.data.max_bucket_reso) == (
        "./train/aki", 512, 256, 1024)
    assert (cfg.network.type, cfg.network.rank, cfg.network.alpha) == ("lora", 32, 16.0)
    assert cfg.network.train_text_encoder  # network_train_unet_only = false: kohya trains both
    o = cfg.optim
    assert (o.optimizer, o.lr_scheduler, o.lr_num_cycles, o.unet_lr, o.text_encoder_lr) == (
        "adamw8bit", "cosine_with_restarts", 2, 1e-4, 1e-5)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.mixed_precision, cfg.train.seed) == (2, 10, "fp16", 1337)
    assert (cfg.output.output_name, cfg.output.save_precision, cfg.data.shuffle_captions) == ("aki", "fp16", True)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"{f}: keys of other trainers, kept without effect here:\n")
    assert "\n  clip_skip: in a WebUI its own Clip skip setting applies" in warning and "\n  xformers: attention runs PyTorch's fused kernels" in warning
    assert ("\n  negative_sampling_method, noise_strength, contrastive_weight, contrastive_warmup_steps: used only "
            "with enable_contrastive") in warning
    assert (cfg.train.save_every_n_epochs, cfg.sample.every_n_epochs) == (1, 5)
    assert "train_batch_size" not in warning and "save_every_n_epochs" not in warning  # those took effect
    assert load_config(f) == load_config(f)  # the same result each time


def assert_refused(f: Path, text: str, said: str) -> None:
    """``text`` alone in the config file ``f`` stops its load with one line starting ``said``."""
    f.write_text(f"{text}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value).startswith(f"{f}: {said}")


# What lora-scripts' GUI (its lora-master form, SDXL) writes for a run, with its defaults.
LORA_SCRIPTS_GUI_TOML = """model_train_type = "sdxl-lora"
pretrained_model_name_or_path = "./sd-models/model.safetensors"
train_data_dir = "./train/aki"
prior_loss_weight = 1
resolution = "1024,1024"
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 2048
bucket_reso_steps = 64
output_name = "aki"
output_dir = "./output"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_epochs = 2
max_train_epochs = 10
train_batch_size = 1
gradient_checkpointing = true
network_train_unet_only = true
network_train_text_encoder_only = false
learning_rate = 1e-4
unet_lr = 1e-4
text_encoder_lr = 1e-5
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1
optimizer_type = "AdamW8bit"
network_module = "networks.lora"
network_dim = 32
network_alpha = 32
network_dropout = 0
enable_block_weights = false
enable_base_weight = false
enable_preview = false
log_with = "tensorboard"
logging_dir = "./logs"
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 0
max_token_length = 255
seed = 1337
clip_skip = 2
mixed_precision = "bf16"
xformers = true
lowram = false
cache_latents = true
cache_latents_to_disk = true
cache_text_encoder_outputs = false
persistent_data_loader_workers = true
vae_batch_size = 1
no_metadata = false
training_comment = "aki, 30 images"
"""


def test_a_lora_scripts_gui_toml_loads_as_it_is(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file lora-scripts' GUI writes: its form's switches (model_train_type, enable_preview,
    enable_block_weights off, ...) are named in the warning; cache_latents and
    cache_latents_to_disk together cache to disk; the training comment goes into the LoRA's
    metadata; a switch that would change the result is an error naming it."""
    f = tmp_path / "aki.toml"
    f.write_text(LORA_SCRIPTS_GUI_TOML, encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        cfg = load_config(f)
    assert (cfg.data.resolution, cfg.data.cache_latents, cfg.data.cache_text_embeddings) == (1024, "disk", True)
    assert (cfg.network.rank, cfg.network.train_text_encoder, cfg.train.mixed_precision) == (32, False, "bf16")
    assert (cfg.train.gradient_checkpointing, cfg.output.training_comment) == (True, "aki, 30 images")
    [warning] = [r.getMessage() for r in caplog.records]
    for key in ("model_train_type", "enable_base_weight", "enable_preview", "vae_batch_size",
                "no_metadata", "cache_text_encoder_outputs"):
        assert f"\n  {key}: " in warning, key
    assert "enable_block_weights" not in warning  # the switch of the block weights, which load (below)
    for cache, to_disk, kept in [(True, False, "memory"), (False, True, "disk"), (False, False, "off")]:
        both = [f"cache_latents={cache}", f"cache_latents_to_disk={to_disk}"]
        assert load_config(None, both).data.cache_latents == kept
    for bad, said in [("model_train_type = 'sdxl-finetune'", "model_train_type: 'sdxl-finetune' is not supported "
                                                             "here; the model's kind is read from the checkpoint "
                                                             "(LoRA training only)"),
                      ("enable_block_weights = false\ndown_lr_weight = '1,0.5'", "down_lr_weight is set but enable_block_weights is false")]:
        assert_refused(f, bad, said)
    # switched on, the block weights its form writes into network_args load (or as keys of their own)
    for lines in ('network_args = ["down_lr_weight=1,0.5", "mid_lr_weight=2", "block_lr_zero_threshold=0.1"]',
                  'down_lr_weight = "1,0.5"\nmid_lr_weight = "2"\nblock_lr_zero_threshold = 0.1'):
        f.write_text(LORA_SCRIPTS_GUI_TOML.replace("enable_block_weights = false", "enable_block_weights = true\n"
                                                   + lines), encoding="utf-8")
        n = load_config(f).network
        assert (n.down_lr_weight, n.mid_lr_weight, n.block_lr_zero_threshold) == ("1,0.5", "2", 0.1)


def test_a_lora_scripts_form_export_loads_as_lora_scripts_runs_it(tmp_path: Path) -> None:
    """lora-scripts' form fields, as its exported configs hold them: the sample prompt fields become
    one prompt line with its options, Prodigy's fields and the custom argument lists join
    optimizer_args and network_args; its other fields are named when they cannot apply."""
    f = tmp_path / "form.toml"
    f.write_text('[training_arguments]\noptimizer_type = "Prodigy"\nprodigy_d0 = "1e-6"\nprodigy_d_coef = "2.0"\n'
                 'optimizer_args_custom = ["decouple=True"]\nnetwork_args = ["conv_dim=4"]\n'
                 'network_args_custom = ["rank_dropout=0.1"]\npositive_prompts = "1girl, (solo:1.2)"\n'
                 'negative_prompts = "lowres"\nsample_width = 512\nsample_height = 768\nsample_cfg = 5\n'
                 'sample_seed = 2333\nsample_steps = 24\nrandomly_choice_prompt = false\nsample_at_first = true\n'
                 'save_last_n_epochs_state = 2\ndylora_unit = 4\nbase_weights = ""\nui_custom_params = ""\n',
                 encoding="utf-8")
    cfg = load_config(f)
    s, o, n = cfg.sample, cfg.optim, cfg.network
    assert (s.prompt, s.negative_prompt, s.width, s.height, s.guidance_scale, s.seed, s.steps, s.at_first) == (
        "1girl, (solo:1.2)", "lowres", 512, 768, 5.0, 2333, 24, True)
    assert (o.optimizer, o.optimizer_args) == ("prodigy", "decouple=True d0=1e-6 d_coef=2.0")
    assert (n.conv_rank, n.rank_dropout) == (4, 0.1)
    f.write_text('optimizer_type = "AdamW"\nprodigy_d_coef = "2.0"\npositive_prompts = "x"\n'
                 'sample_prompts = "y --w 640"\n', encoding="utf-8")
    cfg = load_config(f)  # Prodigy's fields go with Prodigy only; a prompts line of kohya's wins
    assert (cfg.optim.optimizer_args, cfg.sample.prompt, cfg.sample.width) == ("", "y", 640)
    for bad, said in [("randomly_choice_prompt = true", "randomly_choice_prompt: True is not supported here"),
                      ('ui_custom_params = "x = 1"', "ui_custom_params: 'x = 1' is not supported here"),
                      ("blocks_to_swap = 18", "blocks_to_swap: 18 is not supported here"),
                      ("network_multiplier = 0.5", "network_multiplier: 0.5 is not supported here"),
                      ('model_prediction_type = "sigma_scaled"', "model_prediction_type: 'sigma_scaled' is not "
                                                                 "supported here"),
                      ('dataset_config = "d.toml"', "dataset_config: 'd.toml' is not supported here")]:
        assert_refused(f, bad, said)
    assert build_config(flatten_user_dict({"positive_prompts": "a cat", "sample_steps": 8})).sample.steps == 8


def test_kohya_switches_left_off_load_and_switched_on_are_named(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A kohya config carries switches this trainer has no counterpart for: left off (false, 0,
    empty) they are named in the warning; switched on, the run stops with the key named."""
    f = tmp_path / "kohya.toml"
    f.write_text('[training_arguments]\nweighted_captions = false\nface_crop_aug_range = ""\ncaption_prefix = ""\n'
                 'stop_text_encoder_training = 0\nfull_fp16 = false\nno_half_vae = true\ncolor_aug = false\n',
                 encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        load_config(f)
    [warning] = [r.getMessage() for r in caplog.records]
    for key in ("face_crop_aug_range", "stop_text_encoder_training", "no_half_vae"):
        assert key in warning, key
    assert "weighted_captions" not in warning  # a setting of its own (data.weighted_captions)
    for bad, said in [("face_crop_aug_range = \"2.0,4.0\"", "face_crop_aug_range: '2.0,4.0' is not supported here; "
                                                            "lora-trainer has no such setting; leave it off"),
                      ("enable_base_weight = true", "enable_base_weight: True is not supported here")]:
        assert_refused(f, bad, said)
    f.write_text("full_bf16 = true\n", encoding="utf-8")  # the LoRA stays fp32: named, not refused
    caplog.clear()
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        load_config(f)
    assert "full_bf16: the LoRA's own weights stay in fp32" in caplog.text



def test_alpha_mask_and_masked_loss_load_and_masks_of_other_sources_are_refused(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kohya's alpha_mask (with masked_loss, which it then implies) turns data.alpha_mask on;
    masked_loss without masks (neither alpha_mask nor a conditioning_data_dir) stops the load in
    one line naming both, from a file and from --set alike."""
    from lora_trainer.config import parse_set_overrides

    f = tmp_path / "kohya.toml"
    f.write_text("[training_arguments]\nalpha_mask = true\nmasked_loss = true\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        assert load_config(f).data.alpha_mask is True
    assert "masked_loss" in caplog.text
    for text in ("alpha_mask = true", "[data]\nalpha_mask = true", "alpha_mask = true\nmasked_loss = false"):
        f.write_text(text + "\n", encoding="utf-8")
        assert load_config(f).data.alpha_mask is True, text
    f.write_text("masked_loss = false\n", encoding="utf-8")
    assert load_config(f).data.alpha_mask is False and build_config({}).data.alpha_mask is False
    for bad in ("masked_loss = true", "masked_loss = true\nalpha_mask = false"):
        assert_refused(f, bad, "masked_loss: True needs masks: alpha_mask: true")
        assert "\n" not in str(pytest.raises(ConfigError, load_config, f).value)
    f.write_text('alpha_mask = true\nconditioning_data_dir = "masks"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^data.mask_dir: the loss is masked by the alpha channel \(data.alpha_mask\) "
                                          "or by a folder of masks, not both"):
        load_config(f)
    assert parse_set_overrides(["masked_loss=true", "alpha_mask=true"]) == {"data.alpha_mask": True}
    with pytest.raises(ConfigError, match=r"^--set: masked_loss: True needs masks: alpha_mask: true"):
        load_config(None, ["masked_loss=true"])
    assert load_config(None, ["data.alpha_mask=true"]).data.alpha_mask is True
    # the file and --set are read together: either may hold the other half
    f.write_text("alpha_mask = true\n", encoding="utf-8")
    assert load_config(f, ["masked_loss=true"]).data.alpha_mask is True
    f.write_text("masked_loss = true\n", encoding="utf-8")
    assert load_config(f, ["alpha_mask=true"]).data.alpha_mask is True
    with pytest.raises(ConfigError, match=r"^--set: masked_loss: True needs"):
        load_config(f, ["alpha_mask=true", "alpha_mask=false", "masked_loss=true"])


def test_kohya_noise_and_loss_keys_load_into_their_settings(tmp_path: Path) -> None:
    """kohya's input perturbation, noise offset variants and Huber loss keys set the run's
    options; what does not fit is refused before anything loads, naming the field."""
    f = tmp_path / "kohya.toml"
    f.write_text('[training_arguments]\nnoise_offset = 0.05\nnoise_offset_random_strength = true\n'
                 'adaptive_noise_scale = 0.005\nip_noise_gamma = 0.1\nip_noise_gamma_random_strength = true\n'
                 'loss_type = "smooth_l1"\nhuber_c = 0.2\nhuber_schedule = "exponential"\nhuber_scale = 2\n',
                 encoding="utf-8")
    t = load_config(f).train
    assert (t.noise_offset, t.noise_offset_random_strength, t.adaptive_noise_scale) == (0.05, True, 0.005)
    assert (t.ip_noise_gamma, t.ip_noise_gamma_random_strength) == (0.1, True)
    assert (t.loss_type, t.huber_c, t.huber_schedule, t.huber_scale) == ("smooth_l1", 0.2, "exponential", 2.0)
    for sets, said in [(["train.ip_noise_gamma=-0.1"], "train.ip_noise_gamma: -0.1 must be 0 (off) or more"),
                       (["train.ip_noise_gamma_random_strength=true"], "train.ip_noise_gamma_random_strength: works "
                                                                        "on the input perturbation"),
                       (["train.adaptive_noise_scale=0.01"], "train.adaptive_noise_scale: works on the noise offset"),
                       (["train.huber_c=0"], "train.huber_c: 0.0 must be above 0 and at most 1"),
                       (["train.loss_type=huber", "model.arch=flux1"], "train.huber_schedule: snr follows a DDPM "
                                                                        "noise schedule"),
                       (["train.loss_type=mae"], "train.loss_type")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, sets)
    t = load_config(None, ["scale_v_pred_loss_like_noise_pred=true", "v_pred_like_loss=0.1"]).train
    assert (t.scale_v_pred_loss_like_noise_pred, t.v_pred_like_loss) == (True, 0.1)
    for sets, said in [(["scale_v_pred_loss_like_noise_pred=true", "model.prediction_type=epsilon"],
                        "train.scale_v_pred_loss_like_noise_pred: model.prediction_type is epsilon"),
                       (["v_pred_like_loss=0.1", "model.arch=flux1", "data.resolution=512"],
                        "train.v_pred_like_loss: the v-prediction-like loss is for DDPM models")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_config(None, sets)
    assert load_config(None, ["train.loss_type=huber", "train.huber_schedule=constant", "model.arch=flux1",
                              "data.resolution=512"]).train.loss_type == "huber"


def test_other_trainers_tables_and_values(tmp_path: Path) -> None:
    """lora-scripts' older tables ([model] shares our section's name), kohya's "W,H"
    resolution, and the values that change the result: an error naming the key and why."""
    f = tmp_path / "default.toml"
    f.write_text('[model]\nv2 = false\npretrained_model_name_or_path = "m.ckpt"\n[training]\nresolution = "768,512"\n'
                 '[optimizer]\noptimizer_type = "Lion"\n[saving]\nsave_model_as = "safetensors"\n', encoding="utf-8")
    cfg = load_config(f)
    assert (cfg.model.base_model, cfg.data.resolution, cfg.optim.optimizer) == ("m.ckpt", 624, "lion")
    assert load_config(None, ["resolution=[640, 640]"]).data.resolution == 640
    for bad, said in [('save_model_as = "ckpt"', "save_model_as: 'ckpt' is not supported here; LoRA files are "
                                                 "written as .safetensors (safetensors only)"),
                      ("network_train_text_encoder_only = true", "network_train_text_encoder_only: True is not "
                                                                  "supported here; the UNet always trains"),
                      ("enable_contrastive = true", "enable_contrastive: True is not supported here")]:
        assert_refused(f, f"[saving_arguments]\n{bad}", said)
    f.write_text("[training_arguments]\nfoo_bar = 1\nnetwrk_dim = 4\nlearning_rat = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == (f"{f}: unknown config keys 'foo_bar', 'netwrk_dim' (did you mean 'network_dim'?), "
                            "'learning_rat' (did you mean 'learning_rate'?); run 'python -m lora_trainer config "
                            "--example' to see every key")
    f.write_text("[training_arguments\nx = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


def test_a_kohya_sample_prompts_file_gives_every_prompt_with_its_options(tmp_path: Path) -> None:
    """kohya's sample_prompts: each prompt of the .txt file (comments and blank lines skipped),
    a line of sample.prompt each, sampled with its own --n/--w/--h/--d/--s/--l; one prompt (or a
    line given in place of the file) fills the sample fields themselves."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\n\nsks dog, sitting --n lowres, blurry --w 768 --h 512 --d 7 --s 28 --l 5.5\n"
                       "sks dog, running\n", encoding="utf-8")
    f = tmp_path / "cfg.toml"
    f.write_text(f'[sample_prompt_arguments]\nsample_prompts = "{prompts.as_posix()}"\nsample_every_n_epochs = 1\n',
                 encoding="utf-8")
    s = load_config(f).sample
    assert (s.prompt, s.every_n_epochs) == ("sks dog, sitting --n lowres, blurry --w 768 --h 512 --d 7 --s 28 --l 5.5\n"
                                            "sks dog, running", 1)
    assert [(p.prompt, p.negative_prompt, p.width, p.height, p.seed, p.steps, p.guidance_scale)
            for p in sample_prompts_of(s)] == [("sks dog, sitting", "lowres, blurry", 768, 512, 7, 28, 5.5),
                                               ("sks dog, running", "", None, None, 1234, 20, 7.0)]
    prompts.write_text("# one prompt\nsks dog --n lowres --w 768\n", encoding="utf-8")
    s = load_config(f).sample
    assert (s.prompt, s.negative_prompt, s.width) == ("sks dog", "lowres", 768)
    assert load_config(None, ["sample_prompts=a cat --n a dog"]).sample.negative_prompt == "a dog"
    for value, said in [(tmp_path / "none.txt", "not found"), (tmp_path / "p.json", "only a .txt prompts file")]:
        with pytest.raises(ConfigError, match=said):
            load_config(None, [f"sample_prompts={value}"])
    f.write_text(f'sample_prompt = "x"\nsample_prompts = "{prompts.as_posix()}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="'sample_prompts' and 'sample_prompt' both set sample.prompt"):
        load_config(f)



def test_a_bad_option_on_a_sample_prompt_line_is_named_before_the_run() -> None:
    for text, said in [("a cat\na dog --w wide", "sample.prompt line 2: 'wide' after --w must be a whole number"),
                       ("a cat --l high", "sample.prompt line 1: 'high' after --l must be a number"),
                       ("# c\na cat --s 0", "sample.prompt line 1: --s 0 must be at least 1"),
                       ("a cat\n--n blurry", "sample.prompt line 2: '--n blurry' has no prompt before its options")]:
        with pytest.raises(ConfigError) as caught:
            build_config({"sample.prompt": text})
        assert str(caught.value) == said
    assert sample_prompts_of(build_config({"sample.prompt": "# only a comment\n"}).sample) == []


def test_kohya_caption_options_load_into_data_settings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kohya's caption_prefix, caption_suffix, keep_tokens_separator and secondary_separator set
    the data options (no longer named as ignored); a separator that cannot mark tags (blank, a
    comma, overlapping the other) is refused with one line naming the field."""
    f = tmp_path / "kohya.toml"
    f.write_text('[dataset_arguments]\ncaption_prefix = "masterpiece, "\ncaption_suffix = ", from side"\n'
                 'keep_tokens_separator = "|||"\nsecondary_separator = ";;;"\n', encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        d = load_config(f).data
    assert (d.caption_prefix, d.caption_suffix) == ("masterpiece, ", ", from side")
    assert (d.keep_tokens_separator, d.secondary_separator) == ("|||", ";;;")
    assert not any("caption_prefix" in r.getMessage() for r in caplog.records)
    for name in ("caption_prefix", "caption_suffix", "keep_tokens_separator", "secondary_separator"):
        assert ALIASES[name] == f"data.{name}"
        assert build_config({f"data.{name}": ""}).data == TrainConfig().data  # default: off
    for values, said in [({"data.keep_tokens_separator": "  "}, "data.keep_tokens_separator: '  ' cannot mark tags"),
                         ({"data.secondary_separator": ","}, "data.secondary_separator: ',' cannot mark tags"),
                         ({"data.keep_tokens_separator": "|||", "data.secondary_separator": "||"},
                          "data.secondary_separator: '||' overlaps data.keep_tokens_separator '|||'")]:
        with pytest.raises(ConfigError) as caught:
            build_config(values)
        assert str(caught.value).startswith(said) and "\n" not in str(caught.value)


def test_kohya_wildcard_and_epoch_caption_dropout_load_into_data_settings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kohya's enable_wildcard and caption_dropout_every_n_epochs set the data options (no longer
    named as ignored nor refused when on); off by default, a negative epoch count refused in one
    line naming the field."""
    from lora_trainer.config import IGNORED_KEYS

    f = tmp_path / "kohya.toml"
    f.write_text('[dataset_arguments]\nenable_wildcard = true\ncaption_dropout_every_n_epochs = 3\n',
                 encoding="utf-8")
    with caplog.at_level("WARNING", logger="lora_trainer.config"):
        d = load_config(f).data
    assert (d.enable_wildcard, d.caption_dropout_every_n_epochs) == (True, 3)
    assert not any("wildcard" in r.getMessage() or "every_n" in r.getMessage() for r in caplog.records)
    assert "enable_wildcard" not in IGNORED_KEYS and "caption_dropout_every_n_epochs" not in IGNORED_KEYS
    for name in ("enable_wildcard", "caption_dropout_every_n_epochs"):
        assert ALIASES[name] == f"data.{name}"
    assert (TrainConfig().data.enable_wildcard, TrainConfig().data.caption_dropout_every_n_epochs) == (False, 0)
    assert build_config({"caption_dropout_every_n_epochs": None}).data == TrainConfig().data
    with pytest.raises(ConfigError) as caught:
        build_config({"data.caption_dropout_every_n_epochs": -1})
    assert str(caught.value) == "data.caption_dropout_every_n_epochs: -1 must be 0 (off) or more"
