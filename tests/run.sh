#!/usr/bin/env bash
# Install everything the tests need into .venv (once) and run the test suite.
# Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage says how long it took, so a slow CI run's log shows where the time went.
T0=$(date +%s) T=$T0
took() { local now; now=$(date +%s); echo "tests/run.sh: $1 took $((now - T)) s (all so far: $((now - T0)) s)"; T=$now; }
# The venvs take ~6 GB each (the registry's torch is a CUDA build): say what is free, for a failed run's log.
df -Ph . | awk 'NR == 2 { print "tests/run.sh: " $4 " free on the disk of " $6 }'
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
# (In that order: installed after it, pip would print its ancient pins as an ERROR block.)
"$PY" -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null || {
  "$PY" -m pip install -q einops omegaconf
  "$PY" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
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
took "installing"
"$PY" -m pytest -q "$@"
took "the test suite"

# The A1111 WebUI v1.10.1's exact stack (torch 2.1.2, transformers 4.30.2, gradio 3.41.2, ...) in a
# venv of its own, kept between runs: install.py, the training matrix and the tab's UI tests there
# (tests/webui_pins/check.sh; a few minutes, the first time more). LORA_TRAINER_WEBUI_PINS=0 skips it.
if [ "${LORA_TRAINER_WEBUI_PINS:-1}" = "1" ] && [ $# -eq 0 ]; then
  bash tests/webui_pins/check.sh
  took "the A1111 pins check"
fi

# Forge Neo 2.26's and Forge Classic's exact stacks (tests/webui_pins/forge_check.sh): install.py's pip
# calls, the Forge host tests, and the tab's UI tests on Neo's gradio 4.40. LORA_TRAINER_FORGE_PINS=0 skips it.
if [ "${LORA_TRAINER_FORGE_PINS:-1}" = "1" ] && [ $# -eq 0 ]; then
  bash tests/webui_pins/forge_check.sh
  took "the Forge pins checks"
fi
