"""TrainConfig: the one description of an image-LoRA run.

YAML files, ``--set section.field=value`` overrides and the UI all fill it by field path
(``network.rank``). The flat keys users know from lora-scripts and kohya (``lora_rank``,
``train_data_dir``, ...) are accepted as aliases. Every value is checked before any work starts;
a bad key or value raises :class:`ConfigError` with one line naming it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_trainer.config_schema import (  # noqa: F401 - re-exported
    ConfigRoot,
    ConfigSchema,
    _coerce,
    _split_path,
    _suggest,
    check_choices,
    yaml_error_message,
)
from lora_trainer.errors import ConfigError
from lora_trainer.families import family_names

log = logging.getLogger(__name__)


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" is the natural name
    """A dataclass field with help text (shown by ``config --example`` and the README)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    base_model: str = _f("demo", "Base model: a diffusers folder, a single-file .safetensors checkpoint, or 'demo' for the tiny embedded model.")
    arch: str = _f("auto", "Model family; 'auto' detects it from the files.", choices=lambda: ("auto", *family_names()))
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = _f("auto", "What the UNet predicts; 'auto' reads it from the model (SD2 768-v models are v_prediction).")
    vae: str | None = _f(None, "Optional separate VAE (.safetensors file or diffusers folder).")
    allow_pickle: bool = _f(False, "Allow loading pickle checkpoints (.ckpt/.pt). They can run arbitrary code: only for files you trust.")
    weight_dtype: Literal["auto", "fp32", "fp16", "bf16", "fp8", "nf4"] = _f("auto", "dtype of the frozen base weights; 'auto' is fp16/bf16 on a GPU (bf16 when training in bf16) and fp32 on CPU. Flux.1/SD3.5: fp8 stores the transformer's Linear weights as float8 (computed in the auto dtype), nf4 as 4-bit (needs bitsandbytes).")
    clip_l: str | None = _f(None, "Flux.1/SD3.5 single-file model: CLIP-L text encoder (.safetensors file or diffusers folder); with a diffusers folder, replaces its text_encoder.")
    clip_g: str | None = _f(None, "SD3.5 single-file model: CLIP-G text encoder (.safetensors file or diffusers folder).")
    t5xxl: str | None = _f(None, "Flux.1/SD3.5 single-file model: T5-XXL text encoder (.safetensors file or diffusers folder).")
    t5_tokenizer: str | None = _f(None, "Flux.1/SD3.5: folder with T5's tokenizer files (tokenizer.json or spiece.model), e.g. tokenizer_2 of a FLUX.1 diffusers folder; a diffusers folder's own is used when empty.")
    device: str = _f("auto", "'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")


@dataclass
class DataConfig:
    train_data_dir: str = _f("", "Folder of training images (sub-folders named '<repeats>_<name>' set repeats kohya-style).")
    metadata_path: str | None = _f(None, "Caption file 'filename,prompt' (lora-scripts layout). Default: <train_data_dir>/metadata.csv if present, else .txt sidecars.")
    caption_extension: str = _f(".txt", "Extension of caption sidecar files (kohya layout).")
    trigger_word: str = _f("", "Word put in front of every caption (e.g. 'sks dog'); empty for none.")
    shuffle_captions: bool = _f(False, "Shuffle comma-separated tags each step.")
    keep_tokens: int = _f(0, "Keep the first N tags in place when shuffling (the trigger word counts as one).")
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption.")
    caption_dropout_every_n_epochs: int = _f(0, "Train every caption empty in epochs N, 2N, ... (counted from 1; "
                                                "kohya's caption_dropout_every_n_epochs): whole epochs of the "
                                                "unconditional case. 0: off.")
    tag_dropout: float = _f(0.0, "Probability of leaving out each comma-separated tag after the first keep_tokens "
                                 "(kohya's caption_tag_dropout_rate); captions then change every step.")
    caption_prefix: str = _f("", "Text put before every caption, regularization images' too, joined with a space "
                                 "(kohya's caption_prefix; end it with ',' to make it its own tags). Applied before "
                                 "the trigger word check, shuffle, keep_tokens and tag dropout; a dropped caption "
                                 "stays empty.")
    caption_suffix: str = _f("", "Text put after every caption, joined with a space (kohya's caption_suffix; start "
                                 "it with ',' to make it its own tags), like caption_prefix.")
    keep_tokens_separator: str = _f("", "kohya's keep_tokens_separator, e.g. '|||': in a caption containing it, the "
                                        "tags before it stay first and in place instead of the first keep_tokens "
                                        "(the trigger word, when added, first of them); tags after a second one stay "
                                        "at the end. The text encoder never sees it: such captions are their tags "
                                        "joined with ', ', shuffled or not.")
    secondary_separator: str = _f("", "kohya's secondary_separator, e.g. ';;;': tags joined with it count as one "
                                      "tag for shuffle, keep_tokens and tag dropout; the text encoder sees ', ' "
                                      "in its place.")
    enable_wildcard: bool = _f(False, "kohya's enable_wildcard: each time a caption is used, one of its lines (of a "
                                      "caption file with several) and one option of each '{a|b|c}' in it are drawn, "
                                      "before the prefix, suffix, trigger word and shuffle see it. Off, lines and "
                                      "braces are used as written.")
    weighted_captions: bool = _f(False, "kohya's weighted_captions: read captions with the WebUI's emphasis syntax, "
                                        "'(word:1.2)' weighing its tokens, '(word)' by 1.1, '[word]' by 1/1.1, as in a "
                                        "prompt. Off, brackets are plain text in every host (write '\\(' "
                                        "in a prompt for them). Sample prompts are read as prompts either way, as "
                                        "txt2img reads them. SD1, SD2 and SDXL.")
    max_token_length: int = _f(75, "The longest caption in tokens (kohya's max_token_length: 75, 150 or 225): a "
                                   "longer one is cut there. Above 75, standalone SD1, SD2 and SDXL runs read captions "
                                   "(and sample prompts) in chunks of 75, each encoded as the WebUI encodes a long "
                                   "prompt's, joined. In a WebUI, captions are as long as they are: it chunks them "
                                   "itself. Flux.1 and SD3.5 read their own lengths.")
    repeats: int = _f(1, "How many times each image is seen per epoch.")
    flip: bool = _f(False, "Random horizontal flip (do not use for text, logos or asymmetric characters).")
    alpha_mask: bool = _f(False, "Weight the loss by each image's alpha channel (kohya's alpha_mask with masked_loss): "
                                 "transparent areas of PNGs/WebPs do not train, so the LoRA learns the subject, not "
                                 "the background. Images without transparency train everywhere.")
    mask_dir: str | None = _f(None, "Folder of loss masks (kohya's conditioning_data_dir with masked_loss): an image "
                              "for each training image, of the same name (its sub-folder kept, or directly in the "
                              "folder); white areas train, black ones do not (its red channel, as kohya reads it). "
                              "An image without one is reported as no_mask. Regularization images train everywhere. "
                              "Not with alpha_mask.")
    reg_data_dir: str | None = _f(None, "Folder of regularization (class) images with captions.")
    prior_loss_weight: float = _f(1.0, "Loss weight of regularization images.")
    resolution: int = _f(512, "Training resolution (side of the square area buckets are built around).")
    enable_buckets: bool = _f(True, "Group images into aspect-ratio buckets instead of cropping to a square.")
    min_bucket_reso: int = _f(256, "Smallest bucket side.")
    max_bucket_reso: int = _f(1024, "Largest bucket side.")
    bucket_step: int = _f(64, "Bucket sides are multiples of this.")
    bucket_no_upscale: bool = _f(False, "Never upscale an image to fit a bucket; smaller images get smaller buckets.")
    crop: Literal["center", "random"] = _f("center", "How images are cropped to their bucket (or square).")
    color_aug: bool = _f(False, "Color augmentation (kohya's color_aug): each time an image is used, a third of the "
                         "time it gets a hue shift of up to 16 degrees or a gamma of 0.95-1.05. Latents are then "
                         "encoded every step instead of cached.")
    min_image_size: int = _f(64, "Images with a side below this are reported and skipped.")
    on_invalid: Literal["skip", "stop"] = _f("skip", "What to do with invalid files found by validation: skip them, or stop before training.")
    cache_latents: Literal["memory", "disk", "off"] = _f("memory", "Cache VAE latents (flipped images too). Random crops and color_aug change the pixels "
                                                         "each time an image is used: with them the cache is skipped.")
    cache_dir: str | None = _f(None, "Folder of the disk latent cache (default: <output_dir>/.cache).")
    cache_text_embeddings: bool = _f(True, "Cache text-encoder outputs when the text encoder is frozen and captions are fixed.")
    num_workers: int = _f(0, "Data loader worker processes (0 loads in the training process).")
    prefetch: int | None = _f(None, "Batches loaded ahead in a background thread while the current one trains "
                              "(default: 2 on a GPU; 0 on a CPU, where loading and training share the cores).")

    @property
    def token_chunks(self) -> int:
        """How many chunks of 75 tokens a caption may fill (max_token_length)."""
        return -(-self.max_token_length // 75)


NETWORK_TYPES = ("lora", "locon", "dora", "loha", "lokr")
# One line per network type, shown in the tab and in the config reference.
NETWORK_TYPE_HELP = {
    "lora": "LoRA: low-rank update of attention/feed-forward layers (kohya's default; smallest files).",
    "locon": "LoCon: LoRA also on the 3x3 ResNet convolutions, with their own rank (conv_rank/conv_alpha).",
    "dora": "DoRA: LoRA plus a learned magnitude per input channel (dora_scale); closer to full fine-tuning.",
    "loha": "LoHa: Hadamard product of two low-rank pairs; more expressive at the same rank (LyCORIS).",
    "lokr": "LoKr: Kronecker product of two small factors; very small files (LyCORIS).",
}


@dataclass
class NetworkConfig:
    type: Literal["lora", "locon", "dora", "loha", "lokr"] = _f(
        "lora", "Network type. " + " ".join(NETWORK_TYPE_HELP.values()))
    rank: int = _f(16, "LoRA rank (network_dim).")
    alpha: float = _f(8.0, "LoRA alpha; the update is scaled by alpha / rank.")
    dropout: float = _f(0.0, "Dropout on the LoRA path.")
    target_modules: list[str] = _f([], "Module name patterns to adapt; empty for kohya's defaults (attention, feed-forward and 1x1 projections inside transformer blocks).")
    train_unet: bool = _f(True, "Train LoRA on the UNet.")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s).")
    init_from: str | None = _f(None, "Existing LoRA .safetensors to continue training from (its rank and alpha are used).")
    conv_rank: int | None = _f(None, "Rank of the adapters on 3x3 convolutions (kohya's conv_dim). Setting it adapts "
                               "the 3x3 convs with any type; empty: network.rank for locon, no convs otherwise.")
    conv_alpha: float | None = _f(None, "Alpha of the 3x3 conv adapters (kohya's conv_alpha); empty: network.alpha.")
    scale_weight_norms: float | None = _f(None, "Max-norm regularization (kohya's scale_weight_norms; 1 is typical): "
                                          "after each step, a module whose update (up x down x alpha/rank) has a "
                                          "larger norm is scaled back to it. lora and locon only; empty: off.")
    lokr_factor: int = _f(-1, "LoKr: the size of the small Kronecker factor (LyCORIS' factor; lokr_w1 gets this many "
                          "rows and columns where it divides the layer's sizes). -1: as square as possible. A smaller "
                          "factor gives more parameters, closer to full fine-tuning. Other types ignore it, as LyCORIS "
                          "does.")
    down_lr_weight: str = _f("", "Block learning rates (kohya's down_lr_weight; SD1, SD2, SDXL): multipliers of the UNet "
                             "learning rate for the down blocks, shallow to deep, 12 numbers separated by commas (9 "
                             "for SDXL; missing ones are 1), or a curve: sine, cosine, linear, reverse_linear, zeros, "
                             "with '+base' added (e.g. 'sine+0.5'). A block at 0 gets no LoRA. Empty: all 1.")
    mid_lr_weight: str = _f("", "Block learning rates for the mid block (kohya's mid_lr_weight): 1 number (3 for SDXL).")
    up_lr_weight: str = _f("", "Block learning rates for the up blocks (kohya's up_lr_weight), deep to shallow, as "
                           "down_lr_weight.")
    block_lr_zero_threshold: float = _f(0.0, "A block whose learning-rate weight is at most this is not trained "
                                        "(kohya's block_lr_zero_threshold).")
    block_dims: str = _f("", "Ranks per UNet block (kohya's block_dims): 25 whole numbers separated by commas for SD1 "
                         "and SD2 (12 down, mid, 12 up; the first is unused), 23 for SDXL (base, 9 input, 3 middle, 9 "
                         "output, out); 0 leaves a block out. Empty: network.rank everywhere.")
    block_alphas: str = _f("", "Alphas per UNet block (kohya's block_alphas), as block_dims. Empty: network.alpha.")
    conv_block_dims: str = _f("", "Ranks of the 3x3 convolutions per UNet block (kohya's conv_block_dims), as "
                              "block_dims; they adapt the 3x3 convolutions as conv_rank does.")
    conv_block_alphas: str = _f("", "Alphas of the 3x3 convolutions per UNet block (kohya's conv_block_alphas). Empty: "
                                "conv_alpha.")
    lokr_decompose_both: bool = _f(False, "LoKr: make the small factor (lokr_w1) a low-rank pair too, as the large "
                                   "one is (LyCORIS' decompose_both). Other types ignore it.")
    rank_dropout: float = _f(0.0, "Rank dropout (kohya's and LyCORIS' rank_dropout): while training, each rank of "
                             "a LoRA/LoCon module is left out for each image with this probability, the rest scaled "
                             "up to match; LoHa and LoKr leave out rows of their update instead, as LyCORIS does. "
                             "0.1 is typical; 0: off. Not with dora.")
    module_dropout: float = _f(0.0, "Module dropout (kohya's and LyCORIS' module_dropout): while training, each "
                               "module's whole update is left out of a step with this probability. 0.1 is "
                               "typical; 0: off. Not with dora.")
    lycoris_preset: Literal["kohya", "full", "full-lin", "attn-mlp", "attn-only", "unet-only",
                            "unet-transformer-only", "unet-convblock-only"] = _f(
        "kohya", "Which layers get adapters, by LyCORIS' presets (its network_args preset; SD1, SD2, SDXL), with "
        "any type. kohya: kohya's targets (the transformer blocks; with locon or conv_rank also the ResNet blocks "
        "and samplers). full: the transformer and ResNet blocks, samplers, conv_in/conv_out and the time "
        "embedding, 3x3 convs at conv_rank (empty: rank), and the text encoders' attention and MLP. full-lin: "
        "the transformer and ResNet blocks and time embedding, no 3x3 conv. attn-mlp: the transformer blocks. "
        "attn-only: their attention projections (and the text encoders' attention). unet-only: full without "
        "text-encoder layers; unet-transformer-only: attn-mlp without them; unet-convblock-only: the ResNet "
        "blocks, samplers and conv_in/conv_out. Presets without 3x3 convs ignore conv_rank, as LyCORIS does. "
        "Not with target_modules. A kohya config with network_module lycoris.kohya gets LyCORIS' default, full, "
        "unless its network_args name a preset.")


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "lion", "adafactor"] = _f("adamw", "Optimizer. adamw8bit needs bitsandbytes, prodigy needs prodigyopt, lion needs lion-pytorch; adafactor (transformers') runs at learning_rate, without its relative step size.")
    learning_rate: float = _f(1e-4, "Base learning rate.")
    unet_lr: float | None = _f(None, "UNet learning rate (default: learning_rate).")
    text_encoder_lr: float | None = _f(None, "Text-encoder learning rate (default: learning_rate).")
    weight_decay: float = _f(0.01, "Weight decay.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    adam_epsilon: float = _f(1e-8, "Adam epsilon.")
    lr_scheduler: Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial"] = _f("cosine", "Learning-rate schedule after warmup (kohya's constant_with_warmup is constant: every schedule warms up over lr_warmup_steps).")
    lr_warmup_steps: int = _f(0, "Linear warmup steps.")
    lr_num_cycles: int = _f(1, "Restarts for cosine_with_restarts.")
    lr_scheduler_power: float = _f(1.0, "Power of the polynomial schedule's decay (1: linear).")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables).")
    optimizer_args: str = _f("", "More keyword arguments of the optimizer, name=value separated by spaces (kohya's "
                              "optimizer_args), e.g. 'decouple=True d_coef=2' for prodigy; they take the place of "
                              "the settings above (weight_decay, betas=0.9,0.99, eps).")
    loraplus_lr_ratio: float | None = _f(None, "LoRA+: the up matrices (lora_up) learn this many times faster than "
                                         "the down ones, which often trains in fewer steps (kohya's loraplus_lr_ratio; "
                                         "16 is the paper's value). lora, locon and dora only.")


# train.compile_mode: torch.compile's modes (inductor); reduce-overhead and max-autotune record CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class LoopConfig:
    batch_size: int = _f(1, "Images per step.")
    epochs: int = _f(10, "Passes over the dataset (ignored when max_train_steps is set).")
    max_train_steps: int | None = _f(None, "Stop after this many optimizer steps.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _f("auto", "Autocast precision; LoRA parameters stay fp32 (fp16 uses loss scaling). auto: in a WebUI the precision its model computes in; standalone bf16 on a GPU that has it, fp16 on other GPUs, no on a CPU or Apple GPU.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    checkpointing_share: float = _f(1.0, "With gradient_checkpointing: the share of the UNet's (or transformer's) "
                                    "blocks recomputed, above 0 up to 1. Less is faster, more saves memory; the "
                                    "auto preset picks the least that fits.")
    fp32_norms: bool = _f(False, "With fp16/bf16 on a GPU: run GroupNorm and LayerNorm in fp32, autocast's own rule "
                          "(slower, more memory). Off: they compute in the mixed precision; their kernels sum in "
                          "fp32 either way.")
    noise_offset: float = _f(0.0, "Noise offset (helps very dark/bright images); 0.05-0.1 typical.")
    noise_offset_random_strength: bool = _f(False, "With noise_offset: each step's offset strength drawn between 0 and "
                                            "noise_offset (kohya's noise_offset_random_strength).")
    adaptive_noise_scale: float = _f(0.0, "With noise_offset: add this multiple of each latent channel's absolute mean "
                                     "to the offset (kohya's adaptive_noise_scale; about a tenth of noise_offset "
                                     "is typical; 0: off).")
    ip_noise_gamma: float = _f(0.0, "Input perturbation: extra noise in the model's input only, not in its target "
                               "(kohya's ip_noise_gamma; 0.1 typical, 0: off).")
    ip_noise_gamma_random_strength: bool = _f(False, "With ip_noise_gamma: each step's strength drawn between 0 and "
                                              "ip_noise_gamma.")
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = _f(
        "l2", "Loss: l2 (mean squared error), l1, huber or smooth_l1 (pseudo-Huber with threshold huber_c: "
        "squared error for small errors, linear for large ones, so outlier images pull less).")
    huber_c: float = _f(0.1, "huber / smooth_l1: the threshold between squared and linear error (kohya's "
                        "huber_c; 0.1 typical), above 0 and at most 1.")
    huber_schedule: Literal["snr", "exponential", "constant"] = _f(
        "snr", "huber / smooth_l1: how the threshold follows the noise level. snr: about squared error at low "
        "noise, huber_c at high noise (SD1/SD2/SDXL); exponential: from huber_scale down to huber_c x "
        "huber_scale; constant: huber_c x huber_scale.")
    huber_scale: float = _f(1.0, "huber / smooth_l1 with the exponential or constant schedule: the threshold's "
                            "scale.")
    multires_noise_iterations: int = _f(0, "Multi-resolution (pyramid) noise: layers of coarser noise added to the "
                                        "training noise (kohya's multires_noise_iterations; 6-10 typical, 0: off). "
                                        "SD1/SD2/SDXL.")
    multires_noise_discount: float = _f(0.3, "Weight of each coarser layer of the pyramid noise against the last "
                                        "(0.3-0.8).")
    min_snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (5 is typical); empty disables.")
    debiased_estimation_loss: bool = _f(False, "Weight each step's loss by 1/sqrt(SNR) of its timestep (kohya's "
                                         "debiased estimation). SD1/SD2/SDXL.")
    scale_v_pred_loss_like_noise_pred: bool = _f(False, "v-prediction models (SD2 768-v): weight each step's loss "
                                                 "by SNR/(SNR+1) of its timestep, as an epsilon model's loss "
                                                 "weighs it (kohya's scale_v_pred_loss_like_noise_pred).")
    v_pred_like_loss: float = _f(0.0, "Add this multiple of a v-prediction-like loss term, the loss x (SNR+1)/SNR "
                                 "(kohya's v_pred_like_loss; 0: off). SD1/SD2/SDXL.")
    zero_terminal_snr: bool = _f(False, "Rescale the noise schedule so its last timestep is pure noise (kohya's "
                                 "zero_terminal_snr; Lin et al.): the model learns to start from noise alone, for "
                                 "very dark or bright images. Meant for v-prediction models; the WebUI then samples "
                                 "best with 'Noise schedule for sampling: Zero Terminal SNR'. SD1/SD2/SDXL.")
    min_timestep: int = _f(0, "Train only timesteps from this one on (kohya's min_timestep; 0-999). SD1/SD2/SDXL.")
    max_timestep: int | None = _f(None, "Train only timesteps below this one (kohya's max_timestep; 1-1000); empty: "
                                  "all. SD1/SD2/SDXL.")
    seed: int = _f(42, "Random seed (data order, noise, dropout).")
    save_steps: int = _f(0, "Save a resumable checkpoint (and that step's LoRA) every N steps (0: only when "
                         "stopped).")
    save_every_n_epochs: int = _f(0, "Also save a checkpoint and that step's LoRA at the end of every N epochs "
                                  "(0: off).")
    autosave_minutes: float = _f(10.0, "Also save a resumable checkpoint when this many minutes passed since the last "
                                 "one, so a crash, a closed WebUI or a power cut loses at most that much (0: off).")
    resume: str | None = _f(None, "'latest' (the newest checkpoint of this output_name) or a checkpoint folder to "
                                  "continue a run.")
    compile: bool = _f(False, "torch.compile the UNet (or transformer). Each new batch size compiles on its first "
                       "step (minutes with inductor): for long runs on a GPU.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = _f(
        "default", "With train.compile: torch.compile's mode. reduce-overhead replays CUDA graphs (fewer kernel "
        "launches, more memory); max-autotune also tries kernel variants (longer compiles).")
    timestep_sampling: Literal["auto", "uniform", "logit_normal", "sigmoid", "shift", "flux_shift", "sigma"] = _f(
        "auto", "Flux.1/SD3.5: how sigma is drawn; 'auto' is the family's (Flux: sigmoid with the resolution "
        "shift, kohya's flux_shift; SD3.5: logit-normal with shift 3). 'shift' uses discrete_flow_shift; 'sigma' "
        "is kohya's: drawn by weighting_scheme, then shifted by discrete_flow_shift (3 when empty).")
    weighting_scheme: Literal["uniform", "logit_normal"] = _f(
        "uniform", "Flux.1/SD3.5 with timestep_sampling 'sigma': how sigma is drawn before its shift (kohya's "
        "weighting_scheme; 'none' reads as uniform).")
    sigmoid_scale: float | None = _f(None, "Flux.1/SD3.5: the spread of sigmoid sampling (kohya's sigmoid_scale); "
                                     "empty: the family's (1).")
    logit_mean: float | None = _f(None, "Flux.1/SD3.5: the mean of logit-normal sampling (kohya's logit_mean); "
                                  "empty: the family's (0).")
    logit_std: float | None = _f(None, "Flux.1/SD3.5: the spread of logit-normal sampling (kohya's logit_std); "
                                 "empty: the family's (1).")
    discrete_flow_shift: float | None = _f(None, "Flux.1/SD3.5: fixed sigma shift (SD3: 3.0); empty: the family's.")
    guidance_scale: float | None = _f(None, "FLUX.1-dev: guidance value the model is given while training; "
                                      "empty: 3.5 (kohya's and diffusers' default).")


@dataclass
class OutputConfig:
    output_dir: str = _f("output", "Folder for the LoRA file, checkpoints, logs and the run summary.")
    output_name: str = _f("my_lora", "Name of the LoRA file (<output_name>.safetensors).")
    overwrite: bool = _f(False, "Overwrite an existing LoRA of the same name (default: write <name>_v2, _v3, ...).")
    save_precision: Literal["fp16", "bf16", "fp32"] = _f("fp16", "dtype of the saved LoRA tensors.")
    tensorboard: bool = _f(True, "Write TensorBoard logs to <output_dir>/logs/<output_name>.")
    keep_checkpoints: int = _f(3, "How many step checkpoints of a run to keep (its older ones are deleted; 0 keeps "
                                  "all).")
    save_step_loras: bool = _f(True, "At each checkpoint also write <output_name>-stepNNNNNN.safetensors into the "
                               "LoRA folder, to compare steps in the Test section or in txt2img (never deleted).")
    training_comment: str = _f("", "A note kept in the LoRA's metadata (ss_training_comment, as kohya writes it), "
                                "e.g. the trigger word or where the images came from.")


@dataclass
class SampleConfig:
    prompt: str = _f("", "Prompt for sample images during training (empty: no samples). Several prompts: one per "
                     "line, each may end with kohya's options --n negative --w width --h height --d seed "
                     "--s steps --l scale.")
    negative_prompt: str = _f("", "Negative prompt for samples.")
    every_n_steps: int = _f(0, "Render a sample every N steps (0: only when asked).")
    every_n_epochs: int = _f(0, "Also render a sample at the end of every N epochs (0: off).")
    at_first: bool = _f(False, "Also render a sample before the first step (kohya's sample_at_first): the model "
                               "as it draws without this training, to compare the later samples with.")
    every_n_minutes: float = _f(10.0, "Also render a sample when this many minutes of training passed since the "
                                      "last one (0: off), so a long run shows how it goes.")
    seed: int = _f(1234, "Seed of sample images (fixed, so samples are comparable).")
    steps: int = _f(20, "Denoising steps of sample images.")
    guidance_scale: float = _f(7.0, "Classifier-free guidance scale of sample images.")
    width: int | None = _f(None, "Sample width (default: resolution).")
    height: int | None = _f(None, "Sample height (default: resolution).")


@dataclass
class TrainConfig(ConfigRoot):
    task: Literal["image", "llm"] = _f("image", "'image' for Stable Diffusion LoRA; 'llm' for text LoRA (see the llm section).")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        validate(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "network": NetworkConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
}

# Flat keys from lora-scripts / kohya sd-scripts -> field paths.
ALIASES: dict[str, str] = {
    "base_model": "model.base_model",
    "pretrained_model_name_or_path": "model.base_model",
    "v_parameterization": "model.prediction_type",
    "vae": "model.vae",
    "ae": "model.vae",
    "clip_l": "model.clip_l",
    "clip_g": "model.clip_g",
    "t5xxl": "model.t5xxl",
    "timestep_sampling": "train.timestep_sampling",
    "discrete_flow_shift": "train.discrete_flow_shift",
    "weighting_scheme": "train.weighting_scheme",
    "sigmoid_scale": "train.sigmoid_scale",
    "logit_mean": "train.logit_mean",
    "logit_std": "train.logit_std",
    "guidance_scale": "train.guidance_scale",
    "train_data_dir": "data.train_data_dir",
    "metadata_path": "data.metadata_path",
    "caption_extension": "data.caption_extension",
    "trigger_word": "data.trigger_word",
    "shuffle_caption": "data.shuffle_captions",
    "shuffle_captions": "data.shuffle_captions",
    "keep_tokens": "data.keep_tokens",
    "caption_dropout_rate": "data.caption_dropout",
    "caption_tag_dropout_rate": "data.tag_dropout",
    "caption_prefix": "data.caption_prefix",
    "caption_suffix": "data.caption_suffix",
    "keep_tokens_separator": "data.keep_tokens_separator",
    "secondary_separator": "data.secondary_separator",
    "caption_dropout": "data.caption_dropout",
    "weighted_captions": "data.weighted_captions",
    "max_token_length": "data.max_token_length",
    "caption_dropout_every_n_epochs": "data.caption_dropout_every_n_epochs",
    "enable_wildcard": "data.enable_wildcard",
    "repeats": "data.repeats",
    "num_repeats": "data.repeats",
    "flip_aug": "data.flip",
    "alpha_mask": "data.alpha_mask",
    "conditioning_data_dir": "data.mask_dir",
    "reg_data_dir": "data.reg_data_dir",
    "prior_loss_weight": "data.prior_loss_weight",
    "resolution": "data.resolution",
    "enable_bucket": "data.enable_buckets",
    "enable_buckets": "data.enable_buckets",
    "min_bucket_reso": "data.min_bucket_reso",
    "max_bucket_reso": "data.max_bucket_reso",
    "bucket_reso_steps": "data.bucket_step",
    "bucket_no_upscale": "data.bucket_no_upscale",
    "random_crop": "data.crop",
    "color_aug": "data.color_aug",
    "cache_latents": "data.cache_latents",
    "cache_latents_to_disk": "data.cache_latents",
    "max_data_loader_n_workers": "data.num_workers",
    "lora_rank": "network.rank",
    "network_dim": "network.rank",
    "lora_alpha": "network.alpha",
    "network_alpha": "network.alpha",
    "network_dropout": "network.dropout",
    "lora_dropout": "network.dropout",
    "target_modules": "network.target_modules",
    "train_text_encoder": "network.train_text_encoder",
    "network_weights": "network.init_from",
    "network_type": "network.type",
    "conv_dim": "network.conv_rank",
    "conv_alpha": "network.conv_alpha",
    "optimizer_type": "optim.optimizer",
    "optimizer": "optim.optimizer",
    "learning_rate": "optim.learning_rate",
    "lr": "optim.learning_rate",
    "unet_lr": "optim.unet_lr",
    "text_encoder_lr": "optim.text_encoder_lr",
    "weight_decay": "optim.weight_decay",
    "lr_scheduler": "optim.lr_scheduler",
    "lr_warmup_steps": "optim.lr_warmup_steps",
    "lr_scheduler_num_cycles": "optim.lr_num_cycles",
    "lr_scheduler_power": "optim.lr_scheduler_power",
    "max_grad_norm": "optim.max_grad_norm",
    "batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_train_epochs": "train.epochs",
    "max_train_steps": "train.max_train_steps",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "mixed_precision": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "noise_offset": "train.noise_offset",
    "noise_offset_random_strength": "train.noise_offset_random_strength",
    "adaptive_noise_scale": "train.adaptive_noise_scale",
    "ip_noise_gamma": "train.ip_noise_gamma",
    "ip_noise_gamma_random_strength": "train.ip_noise_gamma_random_strength",
    "loss_type": "train.loss_type",
    "huber_c": "train.huber_c",
    "huber_schedule": "train.huber_schedule",
    "huber_scale": "train.huber_scale",
    "multires_noise_iterations": "train.multires_noise_iterations",
    "debiased_estimation_loss": "train.debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred": "train.scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss": "train.v_pred_like_loss",
    "zero_terminal_snr": "train.zero_terminal_snr",
    "min_timestep": "train.min_timestep",
    "max_timestep": "train.max_timestep",
    "multires_noise_discount": "train.multires_noise_discount",
    "min_snr_gamma": "train.min_snr_gamma",
    "seed": "train.seed",
    "save_steps": "train.save_steps",
    "save_every_n_steps": "train.save_steps",
    "save_every_n_epochs": "train.save_every_n_epochs",
    "resume": "train.resume",
    "torch_compile": "train.compile",
    "dynamo_mode": "train.compile_mode",
    "output_dir": "output.output_dir",
    "output_name": "output.output_name",
    "save_precision": "output.save_precision",
    "training_comment": "output.training_comment",
    "loraplus_lr_ratio": "optim.loraplus_lr_ratio",
    "scale_weight_norms": "network.scale_weight_norms",
    "lokr_factor": "network.lokr_factor",
    "sample_prompt": "sample.prompt",
    "sample_every_n_steps": "sample.every_n_steps",
    "sample_at_first": "sample.at_first",
    "sample_every_n_epochs": "sample.every_n_epochs",
    "lr_restart_cycles": "optim.lr_num_cycles",
    "network_train_unet_only": "network.train_text_encoder",
}


def _kohya_resolution(value: Any) -> Any:
    """kohya's "W,H" (or [W, H]) -> the side of a square of the same area (buckets keep the aspect)."""
    parts = [p for p in str(value).strip("[]() ").replace(" ", "").split(",") if p] if not isinstance(value, int) else []
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return value
    width, height = (int(p) for p in parts)
    return width if width == height else int(round((width * height) ** 0.5 / 8)) * 8


def _false(value: Any) -> bool:
    return value in (False, 0, "false", "False", "0", "no", None)


def _unset(value: Any) -> bool:
    """false, 0, empty or None: a switch of another trainer left off."""
    return _false(value) or value in ("", "none", "None", [], ())


# Keys of kohya's / lora-scripts' files that change nothing here: accepted, named in one warning.
_NORM_TRAINING = "LyCORIS' training of the norm layers is not available"
_NO_NORM_TRAINING = f"{_NORM_TRAINING} (false only)"
IGNORED_KEYS: dict[str, tuple[Callable[[Any], bool] | None, str]] = {
    **dict.fromkeys(("xformers", "sdpa", "mem_eff_attn"), (None, "attention runs PyTorch's fused kernels")),
    **dict.fromkeys(("lowram", "highvram", "persistent_data_loader_workers"), (None, "set by the trainer itself")),
    "v2": (None, "the model's kind is read from the checkpoint (model.arch)"),
    "save_model_as": (lambda v: str(v).lower() == "safetensors", "LoRA files are written as .safetensors (safetensors only)"),
    "save_state": (None, "a checkpoint to resume from is always kept (train.save_steps, train.autosave_minutes)"),
    "save_n_epoch_ratio": (None, "saves are set by train.save_every_n_epochs or train.save_steps"),
    "save_last_n_epochs": (None, "how many checkpoints are kept is output.keep_checkpoints; saved LoRAs are all kept"),
    **dict.fromkeys(("logging_dir", "log_prefix", "log_with"), (None, "logs go to <output_dir>/logs/<output_name>")),
    "sample_sampler": (None, "samples use the model's own scheduler"),
    "clip_skip": (None, "in a WebUI its own Clip skip setting applies, as in txt2img; standalone, the layer the "
                        "model's family uses (the last for SD 1.x)"),
    "network_train_text_encoder_only": (_false, "the UNet always trains (false only)"),
    "model_train_type": (lambda v: str(v) in ("sd-lora", "sdxl-lora", "flux-lora", "sd3-lora"),
                         "the model's kind is read from the checkpoint (LoRA training only)"),
    "enable_preview": (None, "samples are rendered whenever sample_prompts (sample.prompt) is set"),
    "enable_base_weight": (_false, "merging other LoRAs into the base model first is not available (false only)"),
    "no_metadata": (_false, "LoRA files always carry their training metadata (false only)"),
    "vae_batch_size": (None, "latents are cached in batches the trainer sizes itself"),
    **dict.fromkeys(("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"),
                    (None, "text embeddings are cached in memory wherever that is exact (a frozen text encoder, "
                           "fixed captions); data.cache_text_embeddings: false turns it off")),
    **dict.fromkeys(("log_tracker_name", "log_tracker_config", "wandb_api_key", "wandb_run_name"),
                    (None, "logs go to <output_dir>/logs/<output_name>")),
    **dict.fromkeys(("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph"),
                    (None, "a run trains on one GPU")),
    **dict.fromkeys(("async_upload", "cache_info", "huggingface_repo_id", "huggingface_repo_type",
                     "huggingface_path_in_repo", "huggingface_token", "huggingface_repo_visibility",
                     "save_state_to_huggingface", "resume_from_huggingface"),
                    (None, "nothing is uploaded; outputs stay in output_dir")),
    "dim_from_weights": (None, "a LoRA continued from network_weights (network.init_from) takes its rank and alpha"),
    "no_half_vae": (None, "the VAE runs in fp32 where fp16 overflows (SDXL's), else in the weights' precision"),
    **dict.fromkeys(("full_fp16", "full_bf16"), (None, "the LoRA's own weights stay in fp32 under mixed precision "
                                                       "(the model computes in fp16/bf16 all the same)")),
    **dict.fromkeys(("token_warmup_min", "token_warmup_step"),
                    (lambda v: v in (0, 1, None), "captions are used whole from the first step (1 and 0 only)")),
    **dict.fromkeys(("face_crop_aug_range", "stop_text_encoder_training"),
                    (_unset, "lora-trainer has no such setting; leave it off")),
    # masked_loss: true is accepted with alpha_mask: true or a conditioning_data_dir (_check_masked_loss)
    "masked_loss": (None, "the loss is masked by the images' alpha channel (alpha_mask) or the masks of "
                          "conditioning_data_dir (data.mask_dir)"),
    "train_norm": (_false, _NO_NORM_TRAINING),
    "enable_contrastive": (_false, "contrastive training is not available (false only)"),
    # lora-scripts' form (its exported configs); its prompt, optimizer and network fields are read in
    # _from_lora_scripts_form
    "randomly_choice_prompt": (_false, "a sample prompt is not drawn from the captions; put one in sample_prompts "
                                       "(false only)"),
    "save_last_n_epochs_state": (None, "how many checkpoints are kept is output.keep_checkpoints"),
    "dylora_unit": (None, "used only with networks.dylora"),
    **dict.fromkeys(("base_weights", "base_weights_multiplier"), (_unset, "used only with enable_base_weight, which "
                                                                         "is not available; leave it empty")),
    "ui_custom_params": (_unset, "its keys are not read from a text field; put them in the config itself"),
    # kohya keys
    "lr_scheduler_type": (_unset, "a scheduler class of your own is not loaded; use lr_scheduler"),
    "dataset_config": (_unset, "a kohya dataset config file is not read; put train_data_dir and the dataset's keys in "
                               "this config"),
    **dict.fromkeys(("save_state_on_train_end", "skip_cache_check", "pytorch_cuda_expandable_segments"),
                    (None, "set by the trainer itself")),
    "network_multiplier": (lambda v: float(v) == 1.0, "the LoRA trains at strength 1 (1 only)"),
    **dict.fromkeys(("blocks_to_swap", "cpu_offload_checkpointing"),
                    (_unset, "block swapping and offloaded checkpoints are not available; model.weight_dtype fp8 or "
                             "nf4 makes Flux.1 and SD3.5 fit small cards; leave it off")),
    "model_prediction_type": (lambda v: str(v) == "raw", "the transformer's output is its raw prediction (raw only)"),
    "model_type": (lambda v: str(v).lower() == "flux", "the model's kind is read from the checkpoint (flux only; "
                                                       "Chroma is not available)"),
    "apply_t5_attn_mask": (None, "T5's padding is not masked, as diffusers and ComfyUI render Flux.1"),
    "t5xxl_max_token_length": (None, "T5 reads 512 tokens (FLUX.1-dev; schnell 256), as diffusers renders it"),
    "train_t5xxl": (_false, "T5-XXL is never trained (false only)"),
    "split_mode": (_false, "Flux.1's split mode is not available; model.weight_dtype fp8 or nf4 makes it fit small "
                           "cards (false only)"),
    "mem_eff_save": (None, "set by the trainer itself"),
    "mode_scale": (None, "used only with weighting_scheme mode, which is not available"),
    **dict.fromkeys(("negative_sampling_method", "noise_strength", "contrastive_weight", "contrastive_warmup_steps"),
                    (None, "used only with enable_contrastive")),
}
# Tables of kohya's and lora-scripts' TOML files: their keys are read as top-level keys.
_KOHYA_TABLES = {"dataset", "additional_network", "optimizer", "training", "sample_prompt", "saving", "others"}


def _kohya_table(name: str) -> bool:
    return name.endswith("_arguments") or name in _KOHYA_TABLES

# Alias keys whose value means something different from the field's (kohya's booleans, "W,H" resolution).
_ALIAS_VALUE_MAPS: dict[str, Any] = {
    "v_parameterization": lambda v: "v_prediction" if _coerce(v, bool, "v_parameterization") else "epsilon",
    "random_crop": lambda v: "random" if _coerce(v, bool, "random_crop") else "center",
    "resolution": lambda v: _kohya_resolution(v),
    "network_train_unet_only": lambda v: not _coerce(v, bool, "network_train_unet_only"),
    "caption_dropout_every_n_epochs": lambda v: 0 if v is None else v,  # lora-scripts may leave it empty
    # every schedule here warms up over lr_warmup_steps
    "lr_scheduler": lambda v: "constant" if str(v).lower() == "constant_with_warmup" else v,
    "weighting_scheme": lambda v: "uniform" if str(v).lower() in ("none", "") else v,
}


# kohya's network_module values -> network.type ("lycoris.kohya" alone is LyCORIS' default algo,
# "lora", which adapts the 3x3 convs too: our locon). LyCORIS' layers are its default preset's,
# "full", unless network_args names another.
NETWORK_MODULES = {"networks.lora": "lora", "lycoris.kohya": "locon"}
# LyCORIS' network_args "algo" values we train -> network.type.
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr", "dora": "dora"}
_NETWORK_ARG_FIELDS = {"conv_dim": "network.conv_rank", "conv_alpha": "network.conv_alpha",
                       "dropout": "network.dropout", "loraplus_lr_ratio": "optim.loraplus_lr_ratio",
                       "factor": "network.lokr_factor", "decompose_both": "network.lokr_decompose_both",
                       "rank_dropout": "network.rank_dropout", "module_dropout": "network.module_dropout",
                       "preset": "network.lycoris_preset",
                       **{k: f"network.{k}" for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight",
                                                      "block_lr_zero_threshold", "block_dims", "block_alphas",
                                                      "conv_block_dims", "conv_block_alphas")}}


# LyCORIS' network_args switches (as kohya_ss writes them for every LyCORIS run): their value off
# (which changes nothing here) and, for any other, why it is refused.
_LYCORIS_SWITCHES: dict[str, tuple[Any, str]] = {
    **dict.fromkeys(("use_tucker", "use_cp", "use_conv_cp"),
                    (False, "the Tucker decomposition of 3x3 convolutions is not available")),
    "disable_conv_cp": (True, "the Tucker decomposition of 3x3 convolutions is not available"),
    "use_scalar": (False, "LyCORIS' trained scalar is not available"),
    "bypass_mode": (False, "the base weights are never merged while training, so bypass mode is what runs"),
    "train_norm": (False, _NORM_TRAINING),
    "full_matrix": (False, "LoKr's factors as full matrices are not available; set network.rank high instead"),
    "rs_lora": (False, "rank-stabilized scaling is not available; scale with network.alpha"),
    "unbalanced_factorization": (False, "LoKr's unbalanced factorization is not available"),
    "wd_on_output": (False, "DoRA's magnitude is per input channel here (wd_on_output=False)"),
    **dict.fromkeys(("constraint", "constrain"), (0.0, "used only with LyCORIS' OFT, which is not available")),
    **dict.fromkeys(("rescaled", "train_on_input"), (False, "used only with LyCORIS' OFT and IA3, which are not "
                                                          "available")),
}
# LyCORIS' network_args accepted whatever their value: DyLoRA's block size and a warning switch
# (no effect here), and rank_dropout_scale (checked against rank_dropout in _network_args).
_LYCORIS_ACCEPTED = {"block_size", "no_dim_warn", "rank_dropout_scale"}


# kohya's per-prompt options in a sample prompts line -> the sample field each sets, and its type.
_PROMPT_OPTIONS: dict[str, tuple[str, type]] = {
    "n": ("negative_prompt", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
    "s": ("steps", int), "l": ("guidance_scale", float)}


def prompt_lines(text: str) -> list[str]:
    """The prompts of a prompts text: one per line, blank lines and ``#`` comments skipped."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def prompt_options(line: str) -> tuple[str, dict[str, str]]:
    """``(prompt, {field: text})`` of one kohya prompt line: ``a cat --n blurry --w 768``."""
    head, *options = (" " + line).split(" --")
    out: dict[str, str] = {}
    for option in options:
        flag, _, arg = option.partition(" ")
        if flag in _PROMPT_OPTIONS and arg.strip():
            out[_PROMPT_OPTIONS[flag][0]] = arg.strip()
    return head.strip(), out


def sample_prompts_of(sample: SampleConfig) -> list[SampleConfig]:
    """Each prompt ``sample.prompt`` holds (one per line) as the sample settings it renders with:
    the section's, with the line's own options in their place. A bad option value raises
    :class:`ConfigError` naming the line."""
    types = dict(_PROMPT_OPTIONS.values())
    out = []
    for n, line in enumerate(prompt_lines(sample.prompt), 1):
        prompt, options = prompt_options(line)
        values: dict[str, Any] = {}
        for name, text in options.items():
            try:
                values[name] = types[name](text)
            except ValueError:
                kind = "a whole number" if types[name] is int else "a number"
                raise ConfigError(f"sample.prompt line {n}: '{text}' after --{_flag_of(name)} must be {kind}") from None
        small = [f"--{_flag_of(k)} {v} must be at least {_LEAST[k]}" for k, v in values.items()
                 if k in _LEAST and v < _LEAST[k]]
        if not prompt or small:
            raise ConfigError(f"sample.prompt line {n}: " + (small[0] if small else
                              f"'{line}' has no prompt before its options"))
        out.append(dataclasses.replace(sample, prompt=prompt, **values))
    return out


_LEAST = {"width": 64, "height": 64, "steps": 1}  # the least value of a prompt line's option


def _flag_of(name: str) -> str:
    return next(flag for flag, (field_name, _) in _PROMPT_OPTIONS.items() if field_name == name)


def _sample_prompts(value: Any) -> dict[str, Any]:
    """kohya's ``sample_prompts``: a .txt file of prompts (``#`` comments; options such as
    ``--n negative --w 512 --h 512 --d seed --s steps --l scale``), or one such line itself.
    One prompt fills the sample fields; several go into sample.prompt a line each, their
    options kept on their lines."""
    text = str(value or "").strip()
    if not text:
        return {}
    path = Path(text).expanduser()
    if path.suffix.lower() in (".txt", ".toml", ".json") or path.is_file():
        if path.suffix.lower() != ".txt":
            raise ConfigError(f"sample_prompts: {text}: only a .txt prompts file is read; put the prompt in "
                              "sample.prompt")
        if not path.is_file():
            raise ConfigError(f"sample_prompts: {text} not found; give the prompts file's path, or put the "
                              "prompt in sample.prompt")
        prompts = prompt_lines(path.read_text(encoding="utf-8", errors="replace"))
        if not prompts:
            raise ConfigError(f"sample_prompts: {text} holds no prompt")
        if len(prompts) > 1:
            return {"sample.prompt": "\n".join(prompts)}
        text = prompts[0]
    prompt, options = prompt_options(text)
    return {"sample.prompt": prompt, **{f"sample.{name}": arg for name, arg in options.items()}}


def _cache_latents(value: Any) -> dict[str, Any]:
    """kohya's boolean ``cache_latents`` (or our value): in memory or off."""
    return {"data.cache_latents": value if isinstance(value, str) else ("memory" if value else "off")}


def _cache_latents_to_disk(value: Any) -> dict[str, Any]:
    """kohya's ``cache_latents_to_disk``: true caches to disk whatever ``cache_latents`` says (files
    of lora-scripts set both); false leaves it to ``cache_latents``."""
    return {"data.cache_latents": "disk"} if _coerce(value, bool, "cache_latents_to_disk") else {}


def _network_module(value: Any) -> dict[str, Any]:
    if str(value).strip() not in NETWORK_MODULES:
        raise ConfigError(f"network_module: {value!r} is not supported; use one of {', '.join(NETWORK_MODULES)} "
                          f"(or network.type: {' | '.join(NETWORK_TYPES)})")
    module = str(value).strip()
    return {"network.type": NETWORK_MODULES[module], **({"network.lycoris_preset": "full"}
                                                        if module == "lycoris.kohya" else {})}


def key_value_pairs(value: Any, where: str, example: str, *, commas: bool = False) -> dict[str, str]:
    """kohya's ``*_args`` (a list of "key=value" strings, one such string, or a mapping) as
    {key: value text}; ``commas``: a string's commas separate pairs too. ``where`` and
    ``example`` ("algo=loha") name the key in the error."""
    if isinstance(value, str):
        value = [v for v in (value.replace(",", " ") if commas else value).split() if v]
    if isinstance(value, dict):
        return {str(k).strip(): str(v).strip() for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list of \"key=value\" strings such as [\"{example}\"]")
    pairs = {}
    for item in value:
        k, eq, v = str(item).partition("=")
        if not eq or not k.strip().isidentifier():
            raise ConfigError(f"{where}: {item!r} is not key=value (e.g. \"{example}\")")
        pairs[k.strip()] = v.strip()
    return pairs


def _optimizer_args(value: Any) -> dict[str, Any]:
    """kohya's ``optimizer_args`` (a list of "name=value" strings) -> optim.optimizer_args."""
    pairs = key_value_pairs(value, "optimizer_args", "weight_decay=0.1")
    return {"optim.optimizer_args": " ".join(f"{k}={''.join(v.split())}" for k, v in pairs.items())}


def optimizer_kwargs(optim: OptimConfig) -> dict[str, Any]:
    """``optim.optimizer_args`` as keyword arguments: Python literals (``True``, ``2``,
    ``0.9,0.99``) as values, anything else as text."""
    import ast

    out: dict[str, Any] = {}
    for k, v in key_value_pairs(optim.optimizer_args, "optim.optimizer_args", "weight_decay=0.1").items():
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def _algo_type(value: Any, where: str) -> str:
    """network.type of a LyCORIS algo name; ``where`` ("network_args: algo=") names it in the error."""
    if str(value).strip().lower() not in LYCORIS_ALGOS:
        raise ConfigError(f"{where}{value} is not supported; use one of {', '.join(LYCORIS_ALGOS)}")
    return LYCORIS_ALGOS[str(value).strip().lower()]


def _lycoris_algo(value: Any) -> dict[str, Any]:
    """lora-scripts' ``lycoris_algo`` (its form's algo for ``network_module = "lycoris.kohya"``)."""
    return {} if _unset(value) else {"network.type": _algo_type(value, "lycoris_algo: ")}


def _fp8_base(value: Any) -> dict[str, Any]:
    """kohya's ``fp8_base`` / ``fp8_base_unet``: the denoiser's weights stored in fp8 (model.weight_dtype)."""
    return {"model.weight_dtype": "fp8"} if _coerce(value, bool, "fp8_base") else {}


def _enable_block_weights(value: Any) -> dict[str, Any]:
    """lora-scripts' ``enable_block_weights``: its form's switch for the block weights, which come
    from network_args (or the down/mid/up_lr_weight keys); checked with them in _check_switches."""
    _coerce(value, bool, "enable_block_weights")
    return {}


def _check_switches(top: dict[str, Any], source: str) -> None:
    """lora-scripts' form switches against the keys they govern, where a file holding both would
    otherwise be guessed at: ``lycoris_algo`` with another network_module (dropped by lora-scripts
    and kohya alike), block weights with ``enable_block_weights = false`` (lora-scripts drops them)."""
    algo, module = top.get("lycoris_algo"), top.get("network_module")
    if not _unset(algo) and module is not None and str(module).strip() != "lycoris.kohya":
        raise ConfigError(f"{source}: lycoris_algo: {algo!r} needs network_module = \"lycoris.kohya\" (it is "
                          f"{str(module)!r}); remove lycoris_algo or change network_module")
    fp8 = next((k for k in ("fp8_base", "fp8_base_unet") if not _unset(top.get(k))), None)
    if fp8 and str(top.get("model_train_type", "")) in ("sd-lora", "sdxl-lora"):
        raise ConfigError(f"{source}: {fp8}: SD1, SD2 and SDXL train with their weights in fp16/bf16 here (fp8 base "
                          f"weights are for Flux.1 and SD3.5); set {fp8} to false")
    weights = [k for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if not _unset(top.get(k))]
    if weights and "enable_block_weights" in top and _false(top["enable_block_weights"]):
        raise ConfigError(f"{source}: {weights[0]} is set but enable_block_weights is false; set it to true to train "
                          f"with block weights, or remove {weights[0]}")


def _network_args(value: Any) -> dict[str, Any]:
    """kohya's ``network_args`` -> field paths."""
    value = key_value_pairs(value, "network_args", "conv_dim=8", commas=True)
    out: dict[str, Any] = {}
    for k, v in value.items():
        if k == "algo":
            out["network.type"] = _algo_type(v, "network_args: algo=")
        elif k == "dora_wd":
            if _coerce(v, bool, "network_args: dora_wd"):
                out["network.type"] = "dora"
        elif k in _NETWORK_ARG_FIELDS:
            out[_NETWORK_ARG_FIELDS[k]] = v
        elif k in _LYCORIS_SWITCHES:
            off, reason = _LYCORIS_SWITCHES[k]
            if _coerce(v, type(off), f"network_args: {k}") != off:
                raise ConfigError(f"network_args: {k}={v}: {reason} ({k}={off} only)")
        elif k not in _LYCORIS_ACCEPTED:
            raise ConfigError(f"network_args: {k!r} is not supported; supported: algo, "
                              f"{', '.join(_NETWORK_ARG_FIELDS)}, dora_wd, rank_dropout_scale, and LyCORIS' "
                              f"switches left off ({', '.join(_LYCORIS_SWITCHES)})")
    if out.get("network.type") == "dora" and value.get("algo", "lora") not in ("lora", "locon", "dora"):
        raise ConfigError(f"network_args: dora_wd with algo={value['algo']} is not supported; DoRA works with "
                          "algo=lora/locon only")
    scale = value.get("rank_dropout_scale")
    if scale is not None and not _coerce(scale, bool, "network_args: rank_dropout_scale") \
            and _coerce(value.get("rank_dropout", 0) or 0, float, "network_args: rank_dropout"):
        raise ConfigError(f"network_args: rank_dropout_scale={scale}: the ranks or rows rank_dropout keeps are "
                          "always scaled up to make up for the dropped ones here; set rank_dropout_scale=True")
    return out


# -- building a config ---------------------------------------------------------------------

SCHEMA = ConfigSchema(
    root=TrainConfig, sections=SECTIONS, aliases=ALIASES, value_maps=_ALIAS_VALUE_MAPS, label="config",
    help_hint="run 'python -m lora_trainer config --example' to see every key",
    example_header=("# lora-trainer config. Every key is optional; shown with its default.",
                    "# Flat keys from lora-scripts/kohya (lora_rank, train_data_dir, ...) work too."),
    foreign=(("llm", "the 'llm' section needs 'task: llm'"),),
    # A later expander overrides an earlier one: lycoris_algo and network_args (more specific) the type
    # network_module implies, cache_latents_to_disk what cache_latents says.
    expanders={"network_module": _network_module, "lycoris_algo": _lycoris_algo, "network_args": _network_args, "sample_prompts": _sample_prompts,
               "cache_latents": _cache_latents, "cache_latents_to_disk": _cache_latents_to_disk,
               "optimizer_args": _optimizer_args, "enable_block_weights": _enable_block_weights,
               "fp8_base": _fp8_base, "fp8_base_unet": _fp8_base},
    ignored=IGNORED_KEYS, key_groups=_kohya_table,
)


def all_field_paths() -> list[str]:
    return SCHEMA.field_paths()


def field_info(path: str) -> dataclasses.Field[Any]:
    return SCHEMA.field_info(path)


def _type_of(path: str) -> Any:
    return SCHEMA.type_of(path)


# lora-scripts' form fields of the sample prompt -> the option of kohya's prompt line each becomes.
_FORM_SAMPLE_OPTIONS = {"negative_prompts": "n", "sample_width": "w", "sample_height": "h", "sample_cfg": "l",
                        "sample_steps": "s", "sample_seed": "d"}


def _listed(value: Any) -> list[Any]:
    return [] if _unset(value) else list(value) if isinstance(value, (list, tuple)) else [value]


def _from_lora_scripts_form(top: dict[str, Any]) -> dict[str, Any]:
    """A lora-scripts form export's own fields, as lora-scripts turns them into kohya's keys before a
    run: its sample prompt fields into one ``sample_prompts`` line (unless one is given) or its
    ``prompt_file``; ``optimizer_args_custom`` and Prodigy's ``prodigy_d0`` / ``prodigy_d_coef`` into
    ``optimizer_args``; ``network_args_custom`` into ``network_args``."""
    top = dict(top)
    optimizer = str(top.get("optimizer_type", top.get("optimizer", ""))).lower()
    extra = _listed(top.pop("optimizer_args_custom", None))
    for key, arg in (("prodigy_d0", "d0"), ("prodigy_d_coef", "d_coef")):
        value = top.pop(key, None)
        if not _unset(value) and optimizer == "prodigy":
            extra.append(f"{arg}={value}")
    if extra:
        top["optimizer_args"] = _listed(top.get("optimizer_args")) + extra
    if network := _listed(top.pop("network_args_custom", None)):
        top["network_args"] = _listed(top.get("network_args")) + network
    positive = top.pop("positive_prompts", None)
    options = {flag: top.pop(key) for key, flag in _FORM_SAMPLE_OPTIONS.items() if key in top}
    prompt_file = top.pop("prompt_file", None)
    if not _unset(prompt_file):
        top["sample_prompts"] = prompt_file
    elif not _unset(positive) and _unset(top.get("sample_prompts")):
        top["sample_prompts"] = " ".join([str(positive).strip()] + [f"--{flag} {value}" for flag, value in
                                                                    options.items() if str(value).strip()])
    return top


def flatten_user_dict(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Turn nested sections, 'a.b' keys and flat aliases into {field_path: raw value}."""
    data = _from_lora_scripts_form(SCHEMA.top_level(data))
    values = SCHEMA.flatten(data, source)
    top = SCHEMA.top_level(data)
    _check_switches(top, source)
    _check_masked_loss(top.get("masked_loss"), values, source)
    return values


def _check_masked_loss(masked_loss: Any, values: dict[str, Any], source: str) -> None:
    """kohya's ``masked_loss`` takes its masks from the images' alpha channel (``alpha_mask``) or
    from a ``conditioning_data_dir`` (``data.mask_dir``): it is accepted where the same values
    give one of them, which implies it."""
    if _unset(masked_loss):
        return
    alpha = values.get("data.alpha_mask", False)
    if not _coerce(alpha, bool, "data.alpha_mask") and _unset(values.get("data.mask_dir")):
        raise ConfigError(f"{source}: masked_loss: {masked_loss!r} needs masks: alpha_mask: true (the images' alpha "
                          "channel) or conditioning_data_dir (a folder of mask images); set one or leave masked_loss "
                          "off")


def build_config(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from {field_path: value}, on top of ``base`` (or the defaults)."""
    return SCHEMA.build(values, base)


def parse_set_overrides(items: list[str]) -> dict[str, Any]:
    """``["network.rank=16", "lora_alpha=8"]`` -> {field_path: value} (values parsed as YAML)."""
    return SCHEMA.parse_set(items)


def _masked_loss_of_set(items: list[str]) -> Any:
    """The value of the last ``masked_loss=...`` among ``--set`` items (None when absent)."""
    masked = [raw for key, _, raw in (i.partition("=") for i in items) if key.strip() == "masked_loss"]
    return (yaml.safe_load(masked[-1]) if masked[-1].strip() else "") if masked else None


def _read_toml(path: Path) -> Any:
    """A TOML file (kohya's and lora-scripts' configs): tomllib on Python 3.11+, else tomli."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise ConfigError(f"{path}: reading a .toml config needs Python 3.11+ or the tomli package "
                              "(pip install tomli, into this Python); or give the same keys as YAML") from None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: YAML, or TOML for a ``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = _read_toml(path) if path.suffix.lower() == ".toml" else yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_message(e, str(path))) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def ignored_note(data: dict[str, Any]) -> str:
    """"keys of other trainers, kept without effect here:" and a line per reason, or "" for none."""
    lines = SCHEMA.ignored_keys(data)
    return "keys of other trainers, kept without effect here:\n" + "\n".join(f"  {line}" for line in lines) if lines else ""


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (optional) and apply ``--set`` overrides."""
    values: dict[str, Any] = {}
    masked_loss, source = None, "--set"
    if path is not None:
        data = _from_lora_scripts_form(SCHEMA.top_level(read_yaml(path)))
        values.update(SCHEMA.flatten(data, str(path)))
        top = SCHEMA.top_level(data)
        _check_switches(top, str(path))
        masked_loss, source = top.get("masked_loss"), str(path)
        note = ignored_note(data)
        if note:
            log.warning("%s: %s", path, note)
    values.update(parse_set_overrides(overrides or []))
    set_masked = _masked_loss_of_set(overrides or [])
    if set_masked is not None:
        masked_loss, source = set_masked, "--set"
    _check_masked_loss(masked_loss, values, source)  # against the file and --set together
    return build_config(values)


# -- cross-field checks --------------------------------------------------------------------


def _is_flow_family(arch: str) -> bool:
    """Whether model.arch names a rectified-flow family (auto: not known before loading)."""
    from lora_trainer.families import get_family

    return arch != "auto" and arch in family_names() and get_family(arch).objective.kind == "flow"

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    """Checks that need more than one field, or a range. Called from ``__post_init__``."""
    cfg.model.arch = check_choices(cfg.model.arch, field_info("model.arch"), "model.arch")
    for check in (_check_network, _check_loop, _check_noise_and_loss, _check_flow, _check_optim, _check_data,
                  _check_outputs):
        check(cfg)


def _check_network(cfg: TrainConfig) -> None:
    need, n = _need, cfg.network
    need(n.rank >= 1, f"network.rank: {n.rank} must be at least 1 (4-128 is typical)")
    need(n.alpha > 0, f"network.alpha: {n.alpha} must be above 0 (often rank or rank/2)")
    need(0.0 <= n.dropout < 1.0, f"network.dropout: {n.dropout} must be in [0, 1)")
    need(n.conv_rank is None or n.conv_rank >= 1, f"network.conv_rank: {n.conv_rank} must be at least 1 (or empty)")
    need(n.conv_alpha is None or n.conv_alpha > 0, f"network.conv_alpha: {n.conv_alpha} must be above 0 (or empty)")
    need(n.dropout == 0 or n.type in ("lora", "locon"),
         f"network.dropout: {n.dropout} works with network.type lora/locon only, not {n.type}; set it to 0")
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(n, name)
        need(0.0 <= value < 1.0, f"network.{name}: {value} must be in [0, 1) (0.1 is typical; 0 is off)")
        need(value == 0 or n.type != "dora",
             f"network.{name}: {value} works with network.type lora, locon, loha or lokr, not dora; set it to 0")
    need(n.lokr_factor == -1 or n.lokr_factor >= 1,
         f"network.lokr_factor: {n.lokr_factor} must be -1 (as square as possible) or at least 1 (4-16 is typical)")
    _check_blocks(cfg)
    _check_preset(cfg)
    need(n.train_unet or n.train_text_encoder,
         "network: train_unet and train_text_encoder are both false; enable at least one")
    need(n.scale_weight_norms is None or n.scale_weight_norms > 0,
         f"network.scale_weight_norms: {n.scale_weight_norms} must be above 0 (or empty)")
    need(n.scale_weight_norms is None or n.type in ("lora", "locon"),
         f"network.scale_weight_norms: max-norm regularization scales the up and down matrices of lora or locon, "
         f"not {n.type}; leave it empty")
    need(not (n.type == "dora" and cfg.model.weight_dtype in ("fp8", "nf4")),
         f"network.type dora needs the base weights in full precision (its magnitude is computed from them); "
         f"set model.weight_dtype to auto, or use lora with {cfg.model.weight_dtype}")


def _check_preset(cfg: TrainConfig) -> None:
    """A LyCORIS preset: not with module patterns; one without text-encoder layers not with a
    trained text encoder; the SD1/SD2/SDXL UNet only (checked again once the model is known)."""
    from lora_trainer.lora.targets import check_preset

    n, name = cfg.network, cfg.network.lycoris_preset
    if name == "kohya":
        return
    _need(not n.target_modules, f"network.lycoris_preset: {name} and network.target_modules both choose the layers; "
                                "set the preset to kohya or empty target_modules")
    check_preset(name, cfg.model.arch, n.train_text_encoder, not _is_flow_family(cfg.model.arch))


def _check_blocks(cfg: TrainConfig) -> None:
    """Block weights and ranks: numbers (or a curve) now, their count against the model's blocks
    once it is known; DDPM UNets only (kohya's networks.lora)."""
    from lora_trainer.lora import blocks

    n, arch = cfg.network, cfg.model.arch
    given = [f for f in (*blocks.LR_FIELDS, *blocks.DIM_FIELDS) if getattr(n, f)]
    if not given:
        return
    _need(not _is_flow_family(arch), f"network.{given[0]}: block weights and ranks are for the SD1, SD2 and SDXL "
                                     f"UNet (kohya's networks.lora), not {arch}; leave it empty")
    dims = [f for f in given if f in blocks.DIM_FIELDS]
    _need(n.init_from is None or not dims,
          f"network.{dims[0] if dims else ''}: with network.init_from the ranks come from that file; leave it empty")
    probes = [arch] if blocks.has_blocks(arch) else blocks.block_archs()  # auto: any of them
    for probe in probes:
        try:
            weights = blocks.lr_weights(probe, n.down_lr_weight, n.mid_lr_weight, n.up_lr_weight,
                                        n.block_lr_zero_threshold)
            blocks.block_ranks(probe, {f: getattr(n, f) for f in blocks.DIM_FIELDS}, n.rank, n.alpha, n.conv_rank,
                               n.conv_alpha, weights)
            return
        except ConfigError:
            if probe == probes[-1]:
                raise


def _check_loop(cfg: TrainConfig) -> None:
    need, t = _need, cfg.train
    need(t.batch_size >= 1, f"train.batch_size: {t.batch_size} must be at least 1")
    need(t.epochs >= 1, f"train.epochs: {t.epochs} must be at least 1")
    need(t.max_train_steps is None or t.max_train_steps >= 1,
         f"train.max_train_steps: {t.max_train_steps} must be at least 1 (or empty)")
    need(t.gradient_accumulation_steps >= 1,
         f"train.gradient_accumulation_steps: {t.gradient_accumulation_steps} must be at least 1")
    need(t.save_steps >= 0, f"train.save_steps: {t.save_steps} must be 0 or more")
    need(t.save_every_n_epochs >= 0, f"train.save_every_n_epochs: {t.save_every_n_epochs} must be 0 or more")
    need(t.autosave_minutes >= 0, f"train.autosave_minutes: {t.autosave_minutes} must be 0 (off) or more")
    need(0 < t.checkpointing_share <= 1,
         f"train.checkpointing_share: {t.checkpointing_share} must be above 0 and at most 1 (1: every block)")
    need(t.min_snr_gamma is None or t.min_snr_gamma > 0,
         f"train.min_snr_gamma: {t.min_snr_gamma} must be above 0 (or empty)")
    top = t.max_timestep if t.max_timestep is not None else 1000
    need(0 <= t.min_timestep < top <= 1000,
         f"train.min_timestep ({t.min_timestep}) and max_timestep ({t.max_timestep}) must keep 0 <= min < max <= 1000")
    need(t.discrete_flow_shift is None or t.discrete_flow_shift > 0,
         f"train.discrete_flow_shift: {t.discrete_flow_shift} must be above 0 (or empty)")
    for name in ("sigmoid_scale", "logit_std"):
        need(getattr(t, name) is None or getattr(t, name) > 0, f"train.{name}: {getattr(t, name)} must be above 0 (or empty)")
    need(t.guidance_scale is None or t.guidance_scale >= 0,
         f"train.guidance_scale: {t.guidance_scale} must be 0 or more (or empty)")


def _check_noise_and_loss(cfg: TrainConfig) -> None:
    need, t = _need, cfg.train
    need(t.noise_offset >= 0, f"train.noise_offset: {t.noise_offset} must be 0 or more")
    for name in ("noise_offset_random_strength", "adaptive_noise_scale"):
        need(not getattr(t, name) or t.noise_offset > 0,
             f"train.{name}: works on the noise offset; set train.noise_offset (0.05-0.1 typical) or turn it off")
    need(t.multires_noise_iterations >= 0,
         f"train.multires_noise_iterations: {t.multires_noise_iterations} must be 0 (off) or more")
    need(0 < t.multires_noise_discount <= 1,
         f"train.multires_noise_discount: {t.multires_noise_discount} must be above 0 and at most 1")
    need(t.ip_noise_gamma >= 0, f"train.ip_noise_gamma: {t.ip_noise_gamma} must be 0 (off) or more (0.1 typical)")
    need(not t.ip_noise_gamma_random_strength or t.ip_noise_gamma > 0,
         "train.ip_noise_gamma_random_strength: works on the input perturbation; set train.ip_noise_gamma "
         "(0.1 typical) or turn it off")
    need(0 < t.huber_c <= 1, f"train.huber_c: {t.huber_c} must be above 0 and at most 1 (0.1 typical)")
    need(t.v_pred_like_loss >= 0, f"train.v_pred_like_loss: {t.v_pred_like_loss} must be 0 (off) or more")
    need(not (t.scale_v_pred_loss_like_noise_pred and cfg.model.prediction_type == "epsilon"),
         "train.scale_v_pred_loss_like_noise_pred: model.prediction_type is epsilon; the scale is for v-prediction "
         "models, turn it off")
    need(t.huber_scale > 0, f"train.huber_scale: {t.huber_scale} must be above 0 (1 keeps huber_c as it is)")


def _check_flow(cfg: TrainConfig) -> None:
    """What a rectified-flow family (Flux.1, SD3.5) needs, and what is for DDPM models only."""
    if not _is_flow_family(cfg.model.arch):
        return
    arch, t = cfg.model.arch, cfg.train
    _need(cfg.data.resolution % 16 == 0,
          f"data.resolution: {cfg.data.resolution} must be a multiple of 16 for {arch} (2x2 latent patches)")
    _need(not t.multires_noise_iterations,
          f"train.multires_noise_iterations: pyramid noise is for DDPM models (SD1/SD2/SDXL); set it to 0 for {arch}")
    for name, what, unset in (("min_snr_gamma", "Min-SNR weighting", None),
                              ("debiased_estimation_loss", "the debiased estimation loss", False),
                              ("scale_v_pred_loss_like_noise_pred", "the v-prediction loss scale", False),
                              ("v_pred_like_loss", "the v-prediction-like loss", 0.0),
                              ("zero_terminal_snr", "a zero-terminal-SNR schedule", False),
                              ("min_timestep", "a timestep range", 0), ("max_timestep", "a timestep range", None)):
        _need(getattr(t, name) == unset,
              f"train.{name}: {what} is for DDPM models (SD1/SD2/SDXL); leave it at {unset} for {arch}")
    _need(t.loss_type not in ("huber", "smooth_l1") or t.huber_schedule != "snr",
          f"train.huber_schedule: snr follows a DDPM noise schedule (SD1/SD2/SDXL); set it to exponential or "
          f"constant for {arch}")


def _check_optim(cfg: TrainConfig) -> None:
    need, o, n = _need, cfg.optim, cfg.network
    need(o.learning_rate > 0, f"optim.learning_rate: {o.learning_rate} must be above 0")
    for name in ("unet_lr", "text_encoder_lr"):
        v = getattr(o, name)
        need(v is None or v >= 0, f"optim.{name}: {v} must be 0 or more")
    need(o.lr_warmup_steps >= 0, f"optim.lr_warmup_steps: {o.lr_warmup_steps} must be 0 or more")
    need(o.lr_num_cycles >= 1, f"optim.lr_num_cycles: {o.lr_num_cycles} must be at least 1")
    need(o.lr_scheduler_power > 0, f"optim.lr_scheduler_power: {o.lr_scheduler_power} must be above 0")
    need(o.max_grad_norm >= 0, f"optim.max_grad_norm: {o.max_grad_norm} must be 0 or more")
    optimizer_kwargs(o)  # each name=value
    need(o.loraplus_lr_ratio is None or o.loraplus_lr_ratio > 0,
         f"optim.loraplus_lr_ratio: {o.loraplus_lr_ratio} must be above 0 (or empty)")
    need(o.loraplus_lr_ratio is None or n.type in ("lora", "locon", "dora"),
         f"optim.loraplus_lr_ratio: LoRA+ needs the up and down matrices of lora, locon or dora, not {n.type}; "
         "leave it empty")


def _check_data(cfg: TrainConfig) -> None:
    need, d = _need, cfg.data
    need(d.max_token_length >= 75, f"data.max_token_length: {d.max_token_length} must be at least 75 (75, 150 or 225 "
                                   "as kohya takes it)")
    need(not (d.alpha_mask and d.mask_dir), "data.mask_dir: the loss is masked by the alpha channel (data.alpha_mask) "
                                            "or by a folder of masks, not both; turn one off")
    need(not (d.weighted_captions and _is_flow_family(cfg.model.arch)),
         f"data.weighted_captions: {cfg.model.arch} cannot weigh caption tokens (SD1, SD2 and SDXL can); set it to "
         "false")
    need(d.resolution >= 64 and d.resolution % 8 == 0,
         f"data.resolution: {d.resolution} must be a multiple of 8 and at least 64")
    need(d.bucket_step >= 8 and d.bucket_step % 8 == 0,
         f"data.bucket_step: {d.bucket_step} must be a multiple of 8")
    need(d.min_bucket_reso <= d.max_bucket_reso,
         f"data.min_bucket_reso ({d.min_bucket_reso}) must not exceed data.max_bucket_reso ({d.max_bucket_reso})")
    need(d.repeats >= 1, f"data.repeats: {d.repeats} must be at least 1")
    need(d.keep_tokens >= 0, f"data.keep_tokens: {d.keep_tokens} must be 0 or more")
    need(0.0 <= d.caption_dropout <= 1.0, f"data.caption_dropout: {d.caption_dropout} must be in [0, 1]")
    need(0.0 <= d.tag_dropout < 1.0, f"data.tag_dropout: {d.tag_dropout} must be in [0, 1)")
    need(d.caption_dropout_every_n_epochs >= 0,
         f"data.caption_dropout_every_n_epochs: {d.caption_dropout_every_n_epochs} must be 0 (off) or more")
    for name in ("keep_tokens_separator", "secondary_separator"):
        sep = getattr(d, name)
        need(not sep or (sep.strip() != "" and "," not in sep),
             f"data.{name}: {sep!r} cannot mark tags (blank, or has a comma: tags are split at commas); use a mark "
             "your captions have nowhere else, e.g. '|||' or ';;;', or leave it empty")
    keep_sep, second = d.keep_tokens_separator, d.secondary_separator
    need(not (keep_sep and second and (keep_sep in second or second in keep_sep)),
         f"data.secondary_separator: {second!r} overlaps data.keep_tokens_separator {keep_sep!r}; use marks "
         "that do not contain one another, e.g. '|||' and ';;;'")
    need(d.prior_loss_weight >= 0, f"data.prior_loss_weight: {d.prior_loss_weight} must be 0 or more")
    need(d.min_image_size >= 1, f"data.min_image_size: {d.min_image_size} must be at least 1")
    need(d.num_workers >= 0, f"data.num_workers: {d.num_workers} must be 0 or more")
    need(d.prefetch is None or d.prefetch >= 0, f"data.prefetch: {d.prefetch} must be 0 or more")


def _check_outputs(cfg: TrainConfig) -> None:
    need, s = _need, cfg.sample
    need(cfg.output.output_name.strip() != "", "output.output_name: must not be empty")
    need(cfg.output.keep_checkpoints >= 0, "output.keep_checkpoints: must be 0 or more")
    need(s.steps >= 1, f"sample.steps: {s.steps} must be at least 1")
    need(s.every_n_steps >= 0, "sample.every_n_steps: must be 0 or more")
    need(s.every_n_epochs >= 0, "sample.every_n_epochs: must be 0 or more")
    need(s.every_n_minutes >= 0, f"sample.every_n_minutes: {s.every_n_minutes} must be 0 (off) or more")
    sample_prompts_of(s)  # each prompt line's options


# -- documentation -------------------------------------------------------------------------

def example_yaml() -> str:
    """A commented YAML with every key, its default and its help text."""
    return SCHEMA.example_yaml()


def reference_markdown() -> str:
    """The config reference table for the README, generated from the help texts."""
    return SCHEMA.reference_markdown()
