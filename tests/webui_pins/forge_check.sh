#!/usr/bin/env bash
# The product on each Forge's exact stack, as check.sh does for the A1111 WebUI v1.10.1:
#   neo      Forge Neo 2.26 (Python 3.13, torch 2.11.0, gradio 4.40.0, transformers 4.56.2,
#            diffusers 0.37.1, peft 0.17.1): forge-neo-2.26.txt
#   classic  Forge Classic (branch classic, 2025-02; Python 3.10, torch 2.6.0, gradio 3.41.2,
#            transformers 4.30.2, diffusers 0.31.0, no peft): forge-classic-2025-02.txt
# Each pins file is the `pip freeze` of a venv built as that Forge's launch code builds it (torch,
# then Neo's gradio, then its requirements), installed here package for package (--no-deps), so
# the venv is that Forge's venv.
#
# 1. install.py runs there through a stand-in for Forge's `launch.run_pip` and must make exactly
#    the pip calls that Forge needs (Neo: none; Classic: peft 0.13.2 without dependencies, and
#    tomli on Python 3.10 for .toml configs); a
#    second start makes none, and every package of the pins file keeps its version.
# 2. smoke.py, then the Forge host tests on that stack (on Neo also the tab's UI tests).
#
# Usage: bash tests/webui_pins/forge_check.sh [neo|classic|all] [pytest args: a subset]
# The venvs (~6 GB each: the registry's torch is a CUDA build, which runs on the CPU) are kept
# between runs outside the checkout: LORA_TRAINER_FORGE_PINS_DIR (default ~/.cache/lora-trainer).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
. tests/webui_pins/lib.sh
CACHE=${LORA_TRAINER_FORGE_PINS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer}
STACKS=(neo classic)
case ${1:-all} in
  neo|classic) STACKS=("$1"); shift ;;
  all) shift || true ;;
esac

# What install.py may add (lora_trainer/hosts/install_plan.py REQUIREMENTS, and what pip brings
# with them) and what the test tools add: whatever of it the Forge does not have is taken out
# first, so install.py and smoke.py see a first start on that Forge's own packages.
ADDED=(diffusers peft PyYAML filelock regex requests importlib-metadata zipp tomli open-clip-torch timm ftfy wcwidth)
TESTS=(
  tests/test_forge_host.py tests/test_forge_script.py tests/test_forge_install.py tests/test_forge_memory.py
  tests/test_hosts_contract.py tests/test_isolation.py tests/test_lora_forward.py
)
TEST_ARGS=("$@")

check_stack() {
  local name=$1 label pythons expected pinned more=()
  case $name in
    # Neo's gradio 4.40.0 (lllyasviel's Forge has it too) is not in the other checks: the tab's
    # UI tests run on it here. Classic's gradio 3.41.2 is A1111's (check.sh runs them there).
    neo) PINS_FILE=$ROOT/tests/webui_pins/forge-neo-2.26.txt; pythons=(3.13); expected=''
         more=(tests/test_ui_unit.py tests/test_ui_state.py) ;;
    classic) PINS_FILE=$ROOT/tests/webui_pins/forge-classic-2025-02.txt; pythons=(3.10 3.11)
             expected='install "peft==0.13.2" --no-deps' ;;
  esac
  label="forge $name pins check"
  VENV=$CACHE/venv-$(basename "$PINS_FILE" .txt)
  pins_venv "$(pins_python "$label" "${pythons[@]}")"
  pinned=$(grep -v -E '^(#|$)' "$PINS_FILE" | LC_ALL=C sort)
  not_pinned_now() { LC_ALL=C comm -23 <(echo "$pinned") <("$PY" -m pip freeze | LC_ALL=C sort); }
  for p in "${ADDED[@]}"; do
    grep -q -i -E "^${p//[-_.]/[-_.]}==" "$PINS_FILE" || "$PY" -m pip uninstall -y -q "$p" 2>/dev/null || true
  done
  if ! pins_stamp_ok all || [ -n "$(not_pinned_now)" ]; then
    echo "$label: installing its packages into $VENV (first time: a few minutes)"
    pip_q install --no-deps -r "$PINS_FILE"
    pins_stamp_set all
  fi
  pins_run_install_py
  echo "$label: install.py, first start: $(echo "${PIP_CALLS:-no pip call}" | tr '\n' ';')"
  [ -z "$(not_pinned_now)" ] || { echo "FAIL: install.py moved Forge's pins: $(not_pinned_now | tr '\n' ' ')"; return 1; }
  # Python 3.10's standard library has no tomllib: install.py adds tomli there (the .toml configs)
  if "$PY" -c 'import sys; sys.exit(sys.version_info >= (3, 11))'; then
    local nl=$'\n'
    expected+="${expected:+$nl}install \"tomli==2.2.1\" --no-deps"
  fi
  if [ "$PIP_CALLS" != "$expected" ]; then
    echo "FAIL: install.py's pip calls on $name: '$PIP_CALLS', expected '$expected'"; return 1
  fi
  HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT" "$PY" tests/webui_pins/smoke.py

  # Test tools, kept to Forge's pins, and the LDM classes the Forge stand-in builds its tiny
  # engines from (their metadata pins ancient versions: --no-deps). The stand-in's tiny engines
  # build a CLIP tokenizer from the vocabulary open_clip ships; Neo has no open_clip and our code
  # does not need it in Forge (smoke.py above runs without it), so it comes with the test tools.
  "$PY" -c "import pytest, open_clip, ldm.modules.diffusionmodules.openaimodel" 2>/dev/null || {
    # (The LDM package's ancient pins are known and unmet on purpose: no conflict warning for them.)
    pip_q install --no-warn-conflicts -c "$PINS_FILE" pytest open-clip-torch
    pip_q install --no-warn-conflicts --no-deps stable-diffusion-sdkit==2.1.5
  }
  [ -z "$(not_pinned_now)" ] || { echo "FAIL: the test tools moved Forge's pins: $(not_pinned_now | tr '\n' ' ')"; return 1; }
  if [ ${#TEST_ARGS[@]} -gt 0 ]; then pins_pytest "${TEST_ARGS[@]}"; else pins_pytest "${TESTS[@]}" "${more[@]}"; fi
  echo "$label: passed on $(grep -i -E '^(torch|transformers|diffusers|peft|gradio|accelerate|safetensors|numpy)==' "$PINS_FILE" | tr '\n' ' ')"
}

for s in "${STACKS[@]}"; do
  check_stack "$s"
done
