#!/usr/bin/env bash
# Install everything the tests need into .venv (once) and run the test suite.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORA_TRAINER_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# A matching torch/torchvision pair from the registry (CPU is enough for the tests).
"$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q torch torchvision
"$PY" -m pip install -q -c .ci/constraints.txt -e ".[test]"
# The WebUI's own LDM model classes, for the WebUI adapter tests. Its metadata pins ancient
# versions of our dependencies, so it goes in without them; einops/omegaconf are what it needs.
"$PY" -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null || {
  "$PY" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
  "$PY" -m pip install -q einops omegaconf
}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -m pytest -q "$@"
# Optional (~3 min): install.py and a LoRA smoke test in a venv with the A1111 WebUI's pins.
if [ "${LORA_TRAINER_WEBUI_PINS:-0}" = "1" ]; then
  bash tests/webui_pins/check.sh
fi
