#!/usr/bin/env bash
# Create the virtual environments of the peers that `python -m fabric.bench tiers-vs-peers`
# compares our host, node and disk tiers against, each apart from the main .venv:
#   .venv-kvcr     kvcr 0.1.1 (Dynamo's successor to KVBM, pure Python over NIXL). It pins
#                  NIXL 1.5.0 while the fabric uses 1.5.1, hence its own venv. nixl==1.5.0 and
#                  nixl-cu12==1.5.0 go in with --no-deps (the `nixl` front package would pull both
#                  cu12 and cu13, about 460 MB, and their metadata asks for a CUDA torch); kvcr's
#                  other dependencies are msgspec and pyzmq; numpy for the runner's buffers.
#   .venv-lmcache  LMCache 0.5.6 with --no-deps on the CPU torch, then what its engine's imports ask
#                  for on a CPU host (never cupy / cuda-python): ../shared/ENVIRONMENT.md, "Peers".
# Both are optional: the benchmark reports a peer whose venv is missing as a row with an `error`.
#
# Usage: launch/setup_peers.sh [kvcr|lmcache ...]     (default: both)
#   FABRIC_PEERS_DIR=/path     where the venvs go (default: the repository root; git-ignored names)
#   FABRIC_PEERS_PYTHON=...    the interpreter they are made from (default: python3.11)
#
# Idempotent and serialised: one flock per venv (as launch/setup.sh), and a stamp of this script
# in each venv skips it when its import check passes. Takes about 1-2 minutes per venv the first
# time (torch's CPU wheel is the largest download).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers_dir="${FABRIC_PEERS_DIR:-$repo}"
base_python="${FABRIC_PEERS_PYTHON:-python3.11}"
want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

TORCH_VERSION="2.13.0"
KVCR_VERSION="0.1.1"
KVCR_NIXL_VERSION="1.5.0"
LMCACHE_VERSION="0.5.6"

log() { printf '[setup_peers] %s\n' "$*"; }

# make_venv NAME CHECK INSTALL_FN: create $peers_dir/NAME under its flock unless its stamp matches
# and CHECK (python code) runs in it; then INSTALL_FN installs into it.
make_venv() {
    local name=$1 check=$2 install=$3
    local venv="$peers_dir/$name"
    mkdir -p "$peers_dir"
    (
        exec 9>"$venv.lock"
        flock 9
        if [[ -f "$venv/.fabric-stamp" && "$(cat "$venv/.fabric-stamp")" == "$want_stamp" ]] \
            && "$venv/bin/python" -c "$check" >/dev/null 2>&1; then
            log "$venv is up to date"
            exit 0
        fi
        if [[ ! -x "$venv/bin/python" ]]; then
            log "creating $venv with $base_python"
            "$base_python" -m venv "$venv"
        fi
        local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
        "${pip[@]}" --upgrade pip >/dev/null
        "$install" "$venv" "${pip[@]}"
        log "checking $venv"
        "$venv/bin/python" -c "$check"
        echo "$want_stamp" >"$venv/.fabric-stamp"
        log "$venv ready"
    )
}

install_kvcr() {
    local venv=$1; shift
    log "installing nixl==$KVCR_NIXL_VERSION nixl-cu12==$KVCR_NIXL_VERSION (--no-deps) into $venv"
    "$@" --no-deps "nixl==$KVCR_NIXL_VERSION" "nixl-cu12==$KVCR_NIXL_VERSION"
    log "installing kvcr==$KVCR_VERSION (--no-deps) and msgspec, pyzmq, numpy"
    "$@" --no-deps "kvcr==$KVCR_VERSION"
    "$@" "msgspec>=0.21,<1" "pyzmq>=25,<28" numpy
}

install_lmcache() {
    local venv=$1; shift
    # torch FIRST: with no torch present a dependency could pull a multi-GB CUDA build.
    if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
        log "installing torch==$TORCH_VERSION (CPU wheel) into $venv"
        "$@" "torch==$TORCH_VERSION"
    fi
    log "installing lmcache==$LMCACHE_VERSION (--no-deps) and its CPU-side imports"
    "$@" --no-deps "lmcache==$LMCACHE_VERSION"
    # lmcache's declared dependencies less the CUDA ones (cupy-cuda13x, cuda-python, cufile-python)
    # and torch (installed above); its engine imports most of them at module level.
    "$@" aiofile aiofiles blake3 aiohttp cryptography fastapi httpx "huggingface_hub>=1.5.0" \
        msgspec "numpy<=2.2.6" numba nvtx "opentelemetry-api>=1.20.0,<=1.40.0" \
        "opentelemetry-sdk>=1.20.0" "opentelemetry-exporter-otlp>=1.20.0" \
        "opentelemetry-exporter-prometheus>=0.50b0,<=0.61b0" "prometheus_client>=0.18.0,<=0.24.1" \
        psutil py-cpuinfo pyyaml "pyzmq>=25.0.0" redis safetensors "setuptools>=77.0.3,<81.0.0" \
        sortedcontainers "transformers>=5.4" uvicorn httptools cachetools
}

KVCR_CHECK="import kvcr, nixl, numpy; from kvcr import KVCR"
LMCACHE_CHECK="import torch, lmcache
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.gpu_connector import GPUConnectorInterface"

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(kvcr lmcache)
for target in "${targets[@]}"; do
    case "$target" in
        kvcr) make_venv .venv-kvcr "$KVCR_CHECK" install_kvcr ;;
        lmcache) make_venv .venv-lmcache "$LMCACHE_CHECK" install_lmcache ;;
        *) echo "setup_peers: unknown peer '$target' (kvcr or lmcache)" >&2; exit 2 ;;
    esac
done
log "done"
