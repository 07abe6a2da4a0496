#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the default test suite: lint, then pytest
# without the slow (vLLM) suites. GPU tests skip with a reason on machines without CUDA.
#   launch/test.sh                 default suite (what CI runs)
#   launch/test.sh --slow          only the slow end-to-end suites (sets up the vLLM env first)
#   launch/test.sh -k pool -x      any other arguments go to pytest
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FABRIC_VENV:-$ROOT/.venv}
"$ROOT/launch/setup.sh"
cd "$ROOT"

marker="not slow"
if [[ "${1:-}" == "--slow" ]]; then
  shift
  marker="slow"
  "$ROOT/launch/setup_vllm.sh"
fi

echo "[test] ruff"
"$VENV/bin/ruff" check fabric tests
"$VENV/bin/ruff" format --check fabric tests
echo "[test] pytest -m \"$marker\""
exec "$VENV/bin/python" -m pytest -m "$marker" "$@"
