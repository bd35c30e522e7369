#!/usr/bin/env bash
# The performance rows of docs/PERFORMANCE.md (issue #13's table) on one GPU, in one go:
# ours vs the plain diffusers+peft loop, peak memory (before the loop and in it) vs the estimate,
# and the profile counts of the first row. Writes OUT/rows.json and OUT/rows.md.
#
#   bash lora_trainer/bench/gpu_rows.sh --download        # here: wheels the GPU machine lacks -> .wheels/
#   bash lora_trainer/bench/gpu_rows.sh OUT               # on the GPU machine (about 5 minutes on an H200)
#   bash lora_trainer/bench/gpu_rows.sh OUT --size tiny   # the same rows with tiny models: checks this script on a CPU
#
# The H200 machine has torch, transformers, peft, safetensors but no diffusers, open_clip_torch,
# ftfy, wcwidth or importlib_metadata, and no network: --download fetches them as wheels (pure
# Python) into .wheels/ (git-ignored; carry it to the machine), and a run installs them into
# .wheels/site when diffusers is missing. Extra arguments go to `python -m lora_trainer.bench.rows`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=.wheels
PACKAGES="diffusers==0.42.1 open_clip_torch==3.3.0 ftfy wcwidth importlib_metadata zipp"

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_17_x86_64 -d "$WHEELS" $PACKAGES
  ls -l "$WHEELS"
  exit 0
fi

OUT=${1:?usage: gpu_rows.sh OUT [--size tiny] | --download}
shift
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "diffusers is missing and $WHEELS/ has no wheels: run 'gpu_rows.sh --download' where a registry is reachable" >&2
    exit 2
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --target "$WHEELS/site" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD/$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
mkdir -p "$OUT"
rc=0
"$PY" -m lora_trainer.bench.rows --out "$OUT" "$@" 2>&1 | tee "$OUT/rows.log" || rc=$?
# The GPU-only tests (the denoiser parked while the caches fill and back bit for bit, a denoiser
# placed on the GPU only after them)
if "$PY" -c "import pytest, torch; assert torch.cuda.is_available()" 2>/dev/null; then
  "$PY" -m pytest -q -m gpu tests/test_train_speed.py tests/test_train_placement.py 2>&1 | tail -5 \
    | tee "$OUT/gpu_tests.log" || rc=$?
fi
exit $rc
