#!/usr/bin/env bash
# Prove that what install.py installs works next to the A1111 WebUI v1.10.1 pins.
#
# Builds a venv with the WebUI's pins (transformers 4.30.2, accelerate 0.21.0, safetensors 0.4.2,
# numpy 1.26.2, huggingface_hub < 1), runs our install.py there through a stand-in for the
# WebUI's `launch.run_pip` (so the real decision logic picks diffusers/peft), checks that a
# second run installs nothing and that no pin moved, then runs smoke.py (import, LoRA into a
# tiny UNet + CLIP, one training step, kohya file written and read back).
#
# Torch: LORA_TRAINER_PINS_TORCH (default 2.13.0, the CPU build; set 2.1.2 for the WebUI's own
# torch, a large CUDA download). Venv: LORA_TRAINER_PINS_VENV (default .venv-webui-pins).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
VENV=${LORA_TRAINER_PINS_VENV:-.venv-webui-pins}
TORCH=${LORA_TRAINER_PINS_TORCH:-2.13.0}
PINS=(transformers==4.30.2 accelerate==0.21.0 safetensors==0.4.2 numpy==1.26.2 pillow==9.5.0 "huggingface_hub<1" pyyaml tqdm)

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$ROOT/$VENV/bin/python"
[ -x "$PY" ] || PY="$VENV/bin/python"
"$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null \
  || "$PY" -m pip install -q "torch==$TORCH"
"$PY" -m pip install -q "${PINS[@]}"
freeze_pins() { "$PY" -m pip freeze | grep -i -E '^(torch|transformers|accelerate|safetensors|numpy|huggingface.hub|tokenizers)==' | sort; }
BEFORE=$(freeze_pins)

# The WebUI runs install.py as `python install.py` with its own folder on PYTHONPATH; `launch`
# there provides run_pip(args, desc). This stand-in runs pip the same way and logs each call.
FAKE=$(mktemp -d)
trap 'rm -rf "$FAKE"' EXIT
cat > "$FAKE/launch.py" <<PYEOF
import os, subprocess, sys
def run_pip(command, desc=None, live=False):
    with open(os.path.join("$FAKE", "pip.log"), "a") as f:
        f.write(command + "\n")
    subprocess.run(f'"{sys.executable}" -m pip {command} --prefer-binary -q', shell=True, check=True)
PYEOF
PYTHONPATH="$FAKE" "$PY" install.py
echo "install.py, first start: $(cat "$FAKE/pip.log" 2>/dev/null | tr '\n' ';')"
rm -f "$FAKE/pip.log"
PYTHONPATH="$FAKE" "$PY" install.py
if [ -s "$FAKE/pip.log" ]; then
  echo "FAIL: a second start installed again: $(cat "$FAKE/pip.log")"; exit 1
fi
AFTER=$(freeze_pins)
if [ "$BEFORE" != "$AFTER" ]; then
  echo "FAIL: install.py changed a WebUI pin:"; diff <(echo "$BEFORE") <(echo "$AFTER") || true; exit 1
fi
"$PY" -m pip check || echo "(pip check reports the above; the WebUI pins are unchanged)"
HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT" "$PY" tests/webui_pins/smoke.py

# The A1111 host tests (LDM model, Trainer, stand-in WebUI) with these versions. open_clip (for
# the CLIP tokenizer's BPE file) needs a torchvision; the tokenizer files are built once by the
# main test venv instead and shared through the cache folder.
"$PY" -m pip install -q pytest einops omegaconf
"$PY" -c "import ldm.modules.diffusionmodules.openaimodel" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps stable-diffusion-sdkit==2.1.5
CACHE=${LORA_TRAINER_CACHE:-$(mktemp -d)}
MAIN_PY=${LORA_TRAINER_VENV:-.venv}/bin/python
[ -x "$MAIN_PY" ] || MAIN_PY=python3
LORA_TRAINER_CACHE="$CACHE" PYTHONPATH="$ROOT" "$MAIN_PY" -c \
  "from lora_trainer.models.tokenizer import load_clip_tokenizer as f; f(); f('!')"
LORA_TRAINER_CACHE="$CACHE" "$PY" -m pytest -q -p no:cacheprovider tests/test_a1111_host.py tests/test_a1111_bundle_archs.py
echo "webui pins check: smoke and A1111 host tests passed"
