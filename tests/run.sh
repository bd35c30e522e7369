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
# The Train LoRA tab and app: the newest gradio, and selenium for the browser tests, which drive
# Debian's chromium through its chromedriver (Playwright's own browser download fails offline).
"$PY" -m pip install -q -c .ci/constraints.txt gradio selenium
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "warning: chromium not installed; browser tests will be skipped"
  else
    echo "warning: install chromium and chromium-driver (apt) to run the browser tests"
  fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -m pytest -q "$@"

# The same UI tests on gradio 3.41.2, the AUTOMATIC1111 WebUI's pin, in a venv of its own (it needs
# old fastapi/httpx). Set LORA_TRAINER_GRADIO3=0 to skip this step (it adds a few minutes).
if [ "${LORA_TRAINER_GRADIO3:-1}" = 1 ] && [ $# -eq 0 ]; then
  VENV3=${LORA_TRAINER_VENV_GRADIO3:-.venv-gradio3}
  [ -x "$VENV3/bin/python" ] || python3 -m venv "$VENV3"
  PY3="$VENV3/bin/python"
  "$PY3" -m pip install -q --upgrade pip
  "$PY3" -c "import torch, torchvision" 2>/dev/null || "$PY3" -m pip install -q torch torchvision
  "$PY3" -m pip install -q -c .ci/constraints.txt -e ".[test]" selenium \
    gradio==3.41.2 fastapi==0.94.0 httpx==0.24.1 httpcore==0.15
  "$PY3" -m pytest -q tests/test_ui_unit.py tests/test_ui_browser.py
fi

# Optional (~3 min; on in CI): install.py and a LoRA smoke test in a venv with the A1111 WebUI's pins.
if [ "${LORA_TRAINER_WEBUI_PINS:-0}" = "1" ]; then
  bash tests/webui_pins/check.sh
fi
