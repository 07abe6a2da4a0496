"""``python -m fabric.bench node-cache --quick`` end to end: every kind of hit serves the whole
reusable prefix where the round says (the node hit on a worker with nothing but its device and
the node cache), with the recompute's output, and the JSON carries the issue's keys; no timing
is judged.

Starts real etcd, a node cache process, four aggregated workers and the frontend on the tiny
model, then a node cache and a NIXL pair for the read rates; the benchmark stops every process
itself, and this test stops the benchmark if it overruns.
"""

from __future__ import annotations

import pytest
from bench_quick import run_quick

pytestmark = [pytest.mark.etcd, pytest.mark.nixl, pytest.mark.slow]

TIMEOUT_S = 240.0
KINDS = ("recompute", "own_host_hit", "node_hit", "peer_hit", "g4_hit")


def test_node_cache_quick_serves_every_hit_with_equal_outputs() -> None:
    result = run_quick("node-cache", TIMEOUT_S)

    assert result["outputs_equal"] is True
    assert set(result["ttft_ms"]) == set(KINDS) and all(v > 0 for v in result["ttft_ms"].values())
    assert set(result["pd_read_gbps"]) == {"node", "nixl", "memcpy"}
    assert all(v > 0 for v in result["pd_read_gbps"].values())
    assert result["reads"]["verified"] is True
    full_blocks = (256 + 21) // 16 * 16  # --quick: 256-token contexts, 21-token turns
    assert result["cached_tokens"] == {"recompute": [0], **{k: [full_blocks] for k in KINDS[1:]}}
    assert result["kv_sources"]["peer_hit"] == ["A"]  # C has neither node cache nor G4
    for kind in ("own_host_hit", "node_hit", "g4_hit"):
        assert result["kv_sources"][kind] == [""], kind  # forced local: no peer read
