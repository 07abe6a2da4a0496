#!/usr/bin/env bash
# Set up the environment (launch/setup.sh), then run the main job on the embedded default: a
# prefill/decode pair (1P1D) on the tiny model, with its own etcd and the OpenAI-compatible
# frontend, answering one request; it prints the answer, the timings and the route the KV took,
# then stops every process. The tiny model is made offline on first use (random weights, so the
# answer is not meant to read well; its point is that the decode worker generated it from KV
# that the prefill worker computed). Extra arguments go to `fabric launch` (see --help), e.g.
#   launch/quickstart.sh --prompt "Hello" --max-tokens 32
#   launch/quickstart.sh --decode 2     (1P2D, serving until Ctrl-C: no --prompt given)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FABRIC_VENV:-$ROOT/.venv}
"$ROOT/launch/setup.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
  set -- --prompt "A prefill worker computes the prompt; a decode worker reads its KV and" \
    --max-tokens 24
fi
exec "$VENV/bin/fabric" launch --prefill 1 --decode 1 --model tiny "$@"
