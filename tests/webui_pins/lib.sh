# Shared by the exact-stack checks (check.sh: A1111 v1.10.1; forge_check.sh: Forge Neo, Forge
# Classic). Sourced, not run. Each check sets PINS_FILE and VENV, builds the WebUI's stack in that
# venv, then uses these pieces: run install.py as the WebUI does, compare the pins, run tests.

# pins_python LABEL VERSION... -> an interpreter of the first of the versions ("3.10", "3.13")
# found: LORA_TRAINER_PINS_PYTHON, then for each version in turn pythonX.Y on PATH or pyenv's
# install (pyenv's shims answer only for the selected version, so its installs are asked directly).
pins_python() {
  local label=$1 c v want
  shift
  want=$(IFS='|'; echo "$*")
  ok() { "$1" -c "import sys; sys.exit('%d.%d' % sys.version_info[:2] not in '$want'.split('|'))" 2>/dev/null; }
  for c in ${LORA_TRAINER_PINS_PYTHON:-}; do
    ok "$c" && { command -v "$c"; return 0; }
  done
  for v in "$@"; do
    c=$(command -v "python$v" 2>/dev/null || true)
    [ -n "$c" ] && ok "$c" && { echo "$c"; return 0; }
    if command -v pyenv >/dev/null 2>&1; then
      for c in $(pyenv versions --bare 2>/dev/null | grep -E "^${v//./\\.}(\\.[0-9]+)?\$" | sort -V); do
        c="$(pyenv root)/versions/$c/bin/python"
        ok "$c" && { echo "$c"; return 0; }
      done
    fi
  done
  c=$(command -v python3 2>/dev/null || true)
  [ -n "$c" ] && ok "$c" && { echo "$c"; return 0; }
  echo "$label: needs Python $(echo "$*" | sed 's/ / or /g') (the WebUI's torch has no wheels for others)" >&2
  return 1
}

# pins_venv BASE_PY: (re)creates $VENV when its Python is not BASE_PY's version; sets PY.
pins_venv() {
  local want
  want=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" != "$want" ]; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$1" -m venv "$VENV"
  fi
  PY=$VENV/bin/python
}

pip_q() { "$PY" -m pip -q --disable-pip-version-check "$@"; }

# pins_stamp_ok WHAT / pins_stamp_set WHAT: whether $VENV was built from this pins file and WHAT.
pins_stamp() { echo "$(sha256sum "$PINS_FILE" | cut -c1-16) $*"; }
pins_stamp_ok() { [ "$(cat "$VENV/.pins-stamp" 2>/dev/null)" = "$(pins_stamp "$@")" ]; }
pins_stamp_set() { pins_stamp "$@" > "$VENV/.pins-stamp"; }

# pins_freeze REGEX: the installed name==version lines whose name matches REGEX, sorted.
pins_freeze() { "$PY" -m pip freeze | grep -i -E "^($1)==" | LC_ALL=C sort; }

# pins_run_install_py: runs install.py twice as the WebUI does (`python install.py`, the WebUI's
# folder on PYTHONPATH, whose `launch` provides run_pip(args, desc)), through a stand-in `launch`
# that runs pip the same way and logs each call. Sets PIP_CALLS (the first start's calls, one a
# line); fails when the second start makes any call.
pins_run_install_py() {
  local fake
  fake=$(mktemp -d)
  cat > "$fake/launch.py" <<PYEOF
import os, subprocess, sys
def run_pip(command, desc=None, live=False):
    with open(os.path.join("$fake", "pip.log"), "a") as f:
        f.write(command + "\n")
    subprocess.run(f'"{sys.executable}" -m pip {command} --prefer-binary -q --disable-pip-version-check', shell=True, check=True)
PYEOF
  PYTHONPATH="$fake" "$PY" install.py || { rm -rf "$fake"; return 1; }
  PIP_CALLS=$(cat "$fake/pip.log" 2>/dev/null || true)
  rm -f "$fake/pip.log"
  PYTHONPATH="$fake" "$PY" install.py || { rm -rf "$fake"; return 1; }
  if [ -s "$fake/pip.log" ]; then
    echo "FAIL: a second start installed again: $(cat "$fake/pip.log")"; rm -rf "$fake"; return 1
  fi
  rm -rf "$fake"
}

# pins_same BEFORE AFTER: fails, showing the difference, when install.py moved a pin.
pins_same() {
  [ "$1" = "$2" ] && return 0
  echo "FAIL: install.py changed a WebUI pin:"; diff <(echo "$1") <(echo "$2") || true
  return 1
}

# pins_pytest ARGS...: the given tests, offline, in the pins venv.
pins_pytest() {
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider "$@"
}
