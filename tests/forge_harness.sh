#!/usr/bin/env bash
# A real Forge Neo on this CPU machine, for trying the extension in it (not for CI, not committed):
# built idempotently into ${FORGE_HARNESS:-$HOME/.cache/forge-neo}, outside the repository:
#   webui/   Forge Neo from the local git snapshot of exo101/sd-webui-forge-neo-v3 (folder webui/,
#            a vendored Forge Neo 2.26), without that copy's third-party extensions
#   venv/    Python 3.13 with what Forge's launch code installs: TORCH_COMMAND's torch/torchvision
#            (the registry's build, run on CPU), GRADIO_PACKAGE, then requirements.txt
#   webui/models/Stable-diffusion/sd15-random.safetensors  a full-width SD1.5 checkpoint (UNet
#            model_channels 320, context 768, CLIP-L, VAE) with random fp16 weights: Forge's
#            detection needs SD1.5's real widths, so a tiny-width checkpoint is not recognised
# Nothing of Forge is copied into the repository; every file comes from the snapshot and pip.
#
# Usage: bash tests/forge_harness.sh                 build (or repair)
#        bash tests/forge_harness.sh start [PORT]    start it with this checkout as an extension
#        bash tests/forge_harness.sh stop
# Env: FORGE_HARNESS (target), MIRROR (snapshots), FORGE_PYTHON (3.13 interpreter),
#      FORGE_CKPT_PYTHON (a Python with torch, transformers, safetensors and
#      stable-diffusion-sdkit's ldm package, to write the checkpoint: the test venv has them).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
H=${FORGE_HARNESS:-$HOME/.cache/forge-neo}
MIRROR=${MIRROR:-$(cd "$ROOT/.." && pwd)/.mirror}
SNAP=exo101+sd-webui-forge-neo-v3
PY313=${FORGE_PYTHON:-python3.13}
CKPT_PY=${FORGE_CKPT_PYTHON:-$ROOT/.venv/bin/python}
FLAGS=(--cpu --force-fp32 --skip-torch-cuda-test --skip-python-version-check --skip-version-check --api)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1

say() { echo "[forge-harness] $*"; }
die() { echo "[forge-harness] ERROR: $*" >&2; exit 1; }

start() {
  local port=${1:-7862}
  ln -sfn "$ROOT" "$H/webui/extensions/lora-trainer"
  if curl -sf "http://127.0.0.1:$port/" > /dev/null 2>&1; then die "port $port is taken (stop that server first)"; fi
  cd "$H/webui"
  nohup "$H/venv/bin/python" launch.py "${FLAGS[@]}" --port "$port" > "$H/server.log" 2>&1 &
  echo $! > "$H/server.pid"
  cd - > /dev/null
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$port/sdapi/v1/sd-models" > /dev/null 2>&1; then
      say "up on http://127.0.0.1:$port (log: $H/server.log)"; return 0
    fi
    kill -0 "$(cat "$H/server.pid")" 2>/dev/null || { tail -n 40 "$H/server.log"; die "Forge exited"; }
    sleep 1
  done
  tail -n 40 "$H/server.log"; die "Forge did not come up in 10 minutes"
}

stop() {
  [ -f "$H/server.pid" ] && kill "$(cat "$H/server.pid")" 2>/dev/null || true
  rm -f "$H/server.pid"
}

case ${1:-build} in
  start) start "${2:-7862}"; exit 0 ;;
  stop) stop; exit 0 ;;
  build) ;;
  *) die "usage: $0 [build|start [PORT]|stop]" ;;
esac

# -- 1. sources -------------------------------------------------------------------------------
GD=$(find "$MIRROR/$SNAP" -maxdepth 2 -name HEAD -printf '%h\n' 2>/dev/null | head -1)
[ -n "$GD" ] || die "no snapshot of ${SNAP/+//} under $MIRROR"
COMMIT=$(git --git-dir="$GD" rev-parse HEAD)
mkdir -p "$H"
if [ "$(cat "$H/webui/.harness-commit" 2>/dev/null)" != "$COMMIT" ]; then
  rm -rf "$H/webui"
  # Every file under webui/ the snapshot holds (its largest binaries may be absent), without
  # the third-party extensions this vendored copy ships with their own dependencies.
  python3 - "$GD" "$COMMIT" "$H" <<'PY' || die "could not extract the snapshot"
import os, subprocess, sys
gd, commit, dest = sys.argv[1:]
tree = subprocess.run(["git", f"--git-dir={gd}", "ls-tree", "-r", "-z", commit, "webui"], check=True,
                      capture_output=True).stdout.split(b"\0")
entries = [e.split(b"\t", 1) for e in tree if e]
files = [(meta.split()[2].decode(), path.decode(), meta.split()[0]) for meta, path in entries
         if meta.split()[1] == b"blob" and not path.startswith(b"webui/extensions/")]
cat = subprocess.Popen(["git", f"--git-dir={gd}", "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
missing = 0
for sha, path, mode in files:
    cat.stdin.write(sha.encode() + b"\n"); cat.stdin.flush()
    header = cat.stdout.readline().split()
    if header[1] == b"missing":
        missing += 1
        continue
    data = cat.stdout.read(int(header[2])); cat.stdout.read(1)
    out = os.path.join(dest, path)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "wb") as f:
        f.write(data)
    if mode == b"100755":
        os.chmod(out, 0o755)
os.makedirs(os.path.join(dest, "webui", "extensions"), exist_ok=True)
print(f"[forge-harness] {len(files) - missing} files extracted, {missing} absent from the snapshot")
PY
  mkdir -p "$H/webui/tmp"  # Forge's galleries write there (temp_dir); git keeps no empty folder
  echo "$COMMIT" > "$H/webui/.harness-commit"
  say "Forge Neo from $SNAP at ${COMMIT:0:10} -> $H/webui"
fi

# -- 2. Python 3.13 + Forge's pins, in its launch code's order ---------------------------------
read -r TORCH_SPECS GRADIO_SPECS <<< "$(python3 - "$H/webui/modules/launch_utils.py" <<'PY'
import re, sys
src = open(sys.argv[1], encoding="utf-8").read()
torch_cmd = re.search(r'"TORCH_COMMAND", f?"([^"]+)"', src).group(1)
torch = ",".join(s.split("+")[0] for s in re.findall(r"torch(?:vision)?==[\w.+]+", torch_cmd))
gradio = ",".join(re.search(r'"GRADIO_PACKAGE", "([^"]+)"', src).group(1).split())
print(torch, gradio)
PY
)"
[ -x "$H/venv/bin/python" ] || "$PY313" -m venv "$H/venv"
VPY=$H/venv/bin/python
STAMP="$TORCH_SPECS $GRADIO_SPECS $(sha256sum "$H/webui/requirements.txt" | cut -c1-16)"
if [ "$(cat "$H/venv/.harness-stamp" 2>/dev/null)" != "$STAMP" ]; then
  say "pip: ${TORCH_SPECS//,/ }, then ${GRADIO_SPECS//,/ }, then requirements.txt (several GB the first time)"
  "$VPY" -m pip install -q ${TORCH_SPECS//,/ } || die "torch install failed"
  "$VPY" -m pip install -q ${GRADIO_SPECS//,/ } || die "gradio install failed"
  (cd "$H/webui" && "$VPY" -m pip install -q -r requirements.txt) || die "requirements install failed"
  "$VPY" -m pip freeze | sort > "$H/venv-freeze-pristine.txt"
  echo "$STAMP" > "$H/venv/.harness-stamp"
fi

# -- 3. a full-width SD1.5 checkpoint with random weights --------------------------------------
CK=$H/webui/models/Stable-diffusion/sd15-random.safetensors
if [ ! -f "$CK" ]; then
  mkdir -p "$(dirname "$CK")"
  say "writing $CK (SD1.5 widths, random fp16 weights, ~2 GB)"
  "$CKPT_PY" - "$CK" <<'PY' || die "checkpoint failed"
import math, os, sys
import torch
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

torch.manual_seed(0)
parts = {
    "model.diffusion_model.": UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320,
                                        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                                        num_heads=8, use_spatial_transformer=True, transformer_depth=1,
                                        context_dim=768, legacy=False),
    "cond_stage_model.transformer.": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                                                  num_attention_heads=12, num_hidden_layers=12,
                                                                  max_position_embeddings=77, vocab_size=49408)),
}
dd = dict(ch=128, out_ch=3, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=[], in_channels=3,
          resolution=256, z_channels=4, double_z=True)
vae = torch.nn.Module()
vae.encoder, vae.decoder = Encoder(**dd), Decoder(**dd)
vae.quant_conv, vae.post_quant_conv = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(4, 4, 1)
parts["first_stage_model."] = vae
sd = {}
with torch.no_grad():
    for prefix, module in parts.items():
        for name, t in module.state_dict().items():
            if prefix.startswith("cond_stage") and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 dropped the prefix SD checkpoints have
            if t.is_floating_point() and t.ndim >= 2:  # random, fan-in scaled, never zero
                t = torch.randn(t.shape) / math.sqrt(t[0].numel())
            elif t.is_floating_point() and name.endswith("weight"):
                t = 1.0 + 0.1 * torch.randn(t.shape)
            elif t.is_floating_point():
                t = 0.02 * torch.randn(t.shape)
            sd[prefix + name] = t.to(torch.float16).contiguous() if t.is_floating_point() else t.contiguous()
sd.setdefault("cond_stage_model.transformer.text_model.embeddings.position_ids", torch.arange(77)[None])
save_file(sd, sys.argv[1] + ".part")
os.replace(sys.argv[1] + ".part", sys.argv[1])
print(f"[forge-harness] {len(sd)} tensors, {sum(v.numel() for v in sd.values()) / 1e9:.2f} G values")
PY
fi
say "built: bash $0 start [PORT] (flags: ${FLAGS[*]})"
