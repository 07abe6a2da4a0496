#!/usr/bin/env bash
# Set up the environment (launch/setup.sh) and run the main job on the embedded default.
# Today that is the KV block manager demo: one worker's KV blocks on real tensors, written by a
# fake prefill, offloaded device -> host -> disk, evicted, matched and onboarded back, bytes
# verified. Extra arguments go to `fabric demo` (see `fabric demo --help`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FABRIC_VENV:-$ROOT/.venv}
"$ROOT/launch/setup.sh"
exec "$VENV/bin/fabric" demo "$@"
