#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the default test suite: lint, then pytest
# without the slow (vLLM) suites. GPU tests skip with a reason on machines without CUDA.
#   launch/test.sh                 default suite (what CI runs)
#   launch/test.sh --slow          only the slow end-to-end suites (sets up the vLLM env first):
#                                  the vLLM connector suite under .venv-vllm, then the rest
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
if [[ "$marker" == "slow" ]]; then
  "$ROOT/.venv-vllm/bin/python" -m pytest tests/integrations -m slow "$@"
  exec "$VENV/bin/python" -m pytest -m slow --ignore=tests/integrations "$@"
fi
exec "$VENV/bin/python" -m pytest -m "$marker" "$@"
