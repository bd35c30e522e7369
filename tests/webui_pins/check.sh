#!/usr/bin/env bash
# The product on the exact stack of an AUTOMATIC1111 WebUI v1.10.1: torch 2.1.2 + torchvision
# 0.16.2 on Python 3.10, transformers 4.30.2, accelerate 0.21.0, safetensors 0.4.2, numpy 1.26.2,
# Pillow 9.5.0, gradio 3.41.2, open-clip-torch 2.20.0 ... (every version from a fresh WebUI's venv:
# a1111-v1.10.1.txt beside this file).
#
# 1. install.py runs there through a stand-in for the WebUI's `launch.run_pip` (so the real
#    decision logic picks diffusers/peft); a second run must install nothing and no pin may move.
# 2. smoke.py: import, LoRA into a tiny UNet + CLIP, one step, kohya file written and read back.
# 3. the training matrix on that torch: fp32 on the CPU (no fused AdamW before torch 2.4), resume,
#    gradient checkpointing, text-encoder training, SD1/SD2/SDXL, the A1111 host on the WebUI's
#    LDM classes, captioning, text LoRA, and the tab's UI tests on gradio 3.41.2.
#
# The venv (~6 GB: torch 2.1.2 is the registry's CUDA build, which runs on the CPU) is kept
# between runs outside the checkout: LORA_TRAINER_PINS_VENV (default
# ~/.cache/lora-trainer/venv-a1111-v1.10.1). Pass pytest arguments to run a subset.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
PINS_FILE=$ROOT/tests/webui_pins/a1111-v1.10.1.txt
VENV=${LORA_TRAINER_PINS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer/venv-a1111-v1.10.1}
# What the WebUI's venv has that our code or tests touch; versions come from the pins file.
PACKAGES=(torch torchvision transformers accelerate safetensors numpy Pillow huggingface_hub tokenizers
  gradio gradio_client fastapi httpx httpcore pydantic open-clip-torch ftfy einops omegaconf
  pytorch_lightning protobuf PyYAML tqdm requests filelock regex)

. tests/webui_pins/lib.sh
# The WebUI runs on Python 3.10 (3.11 works); torch 2.1.2 has no wheels for newer versions.
pins_venv "$(pins_python "webui pins check" 3.10 3.11)"
if ! pins_stamp_ok "${PACKAGES[*]}"; then
  echo "webui pins check: installing the WebUI's stack into $VENV (first time: a few minutes)"
  pip_q install -c "$PINS_FILE" "${PACKAGES[@]}"
  # Where the WebUI's pins disagree with a package's declared ranges, the WebUI wins, as it does
  # there; a new conflict shows here.
  pins_stamp_set "${PACKAGES[*]}"
fi
"$PY" -c "import torch, transformers, gradio; print('webui pins check: torch', torch.__version__, \
'transformers', transformers.__version__, 'gradio', gradio.__version__)"
# What install.py adds is taken out again first, so every run checks a first start as users get it.
"$PY" -m pip uninstall -y -q diffusers peft importlib-metadata zipp tomli 2>/dev/null || true
PINNED='torch|torchvision|transformers|accelerate|safetensors|numpy|pillow|gradio|huggingface.hub|tokenizers|open.clip.torch'
BEFORE=$(pins_freeze "$PINNED")
pins_run_install_py
echo "webui pins check: install.py, first start: $(echo "$PIP_CALLS" | tr '\n' ';')"
AFTER=$(pins_freeze "$PINNED")
pins_same "$BEFORE" "$AFTER"
HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT" "$PY" tests/webui_pins/smoke.py

# Test tools (not WebUI packages, so they may be the newest that install there) and the WebUI's
# LDM model classes for the host tests (their metadata pins ancient versions: --no-deps).
"$PY" -c "import pytest, selenium, ldm.modules.diffusionmodules.openaimodel" 2>/dev/null || {
  pip_q install -c "$PINS_FILE" pytest selenium
  pip_q install --no-deps stable-diffusion-sdkit==2.1.5
}
TESTS=(
  tests/test_torch_compat.py tests/test_fsutil.py          # the torch-version shims, file modes
  tests/test_train_loop.py tests/test_train_precision.py   # fp32 CPU runs, checkpointing, SDXL, SD2-v
  tests/test_train_resume.py tests/test_train_data.py      # exact resume, text-encoder training
  tests/test_train_maths.py tests/test_objectives.py       # noise, losses, weights, optimizers
  tests/test_data_text.py                                  # the captions a step trains with
  tests/test_data_images.py                                # reading images on Pillow 9.5
  tests/test_data_emphasis.py                              # weighted captions on transformers 4.30
  tests/test_a1111_host.py tests/test_a1111_bundle_archs.py tests/test_a1111_script.py
  tests/test_lora_inject.py tests/test_lora_kohya.py tests/test_lora_files.py tests/test_lora_webui_keys.py
  tests/test_lora_variants.py tests/test_lora_inspect.py  # LoCon, DoRA, LoHa, LoKr on peft 0.13.2
  tests/test_lora_blocks.py                                # kohya's block weights and ranks
  tests/test_lora_presets.py                               # LyCORIS' presets and kohya_ss' switches
  tests/test_lora_dropouts.py                              # rank and module dropout (peft 0.13.2 LoHa/LoKr)
  tests/test_lora_forward.py                               # the lean LoRA forward every run takes
  tests/test_train_speed.py                                # the casts skipped under autocast, peft 0.13.2
  tests/test_train_norms.py                                # the norms in the compute dtype, GroupNorm32 included
  tests/test_train_checkpointing.py                        # checkpointing of all or a share of the blocks
  tests/test_memory_check.py                               # a run's memory estimate on torch 2.1.2, CLIP of 4.30
  tests/test_preflight.py tests/test_train_disk.py
  tests/test_models_setups.py tests/test_models_loaders.py
  tests/test_caption_blip.py tests/test_caption_clip.py tests/test_caption_run.py
  tests/test_llm_train.py
  tests/test_ui_unit.py tests/test_ui_state.py tests/test_ui_browser.py  # the tab on the WebUI's gradio 3.41.2
)
# Not here: what needs diffusers 0.35's pipelines, which import transformers classes newer than
# 4.30 (the standalone loaders' reference, and the standalone app's test render: in the WebUI the
# Test section renders through the WebUI's own txt2img), references built from open_clip 3
# internals, FLUX.1's transformer (diffusers builds it with torch.nn.RMSNorm, torch 2.4+) and the
# FLUX.1 / SD3.5 training runs (their T5 tokenizer needs tokenizers newer than the WebUI's 0.13);
# the WebUI runs neither family. The newest stack runs them.
DESELECT=(
  tests/test_ui_browser.py::test_5_test_grid_at_two_weights
  tests/test_models_setups.py::test_encode_text_matches_diffusers_pipeline
  tests/test_models_loaders.py::test_diffusers_folder_round_trip
  tests/test_models_loaders.py::test_single_file_sd2_uses_open_clip_penultimate_layer
  tests/test_models_loaders.py::test_single_file_sdxl_text_encoders_match_sgm_conditioning
  "tests/test_train_checkpointing.py::test_units_of_flux_and_sd3_are_their_transformer_blocks[tiny_flux]"
  tests/test_train_checkpointing.py::test_flux_and_sd35_train_exactly_with_a_share_of_their_blocks_checkpointed
  tests/test_lora_blocks.py::test_block_settings_are_refused_on_a_transformer
  tests/test_lora_presets.py::test_preset_on_a_model_without_a_kohya_unet_is_refused_at_injection
)
[ $# -gt 0 ] && TESTS=("$@")
pins_pytest "${TESTS[@]}" "${DESELECT[@]/#/--deselect=}"
echo "webui pins check: passed on $(echo "$AFTER" | tr '\n' ' ')"
