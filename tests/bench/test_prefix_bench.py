"""``python -m fabric.bench prefix --quick`` end to end: every kind of hit happens where the
round says, serves the whole reusable prefix and gives the recompute's output; no timings.

Starts real etcd, three aggregated workers (two sharing a G4 directory; NIXL peer reads) and the
frontend on the tiny model; the benchmark stops every process itself, and this test stops the
benchmark (SIGTERM, which it turns into a clean shutdown, then SIGKILL) if it overruns.
"""

from __future__ import annotations

import pytest
from bench_quick import run_quick

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

TIMEOUT_S = 120.0
KINDS = ("recompute", "device_hit", "host_hit", "disk_hit", "peer_hit")


def test_prefix_quick_hits_every_tier_with_equal_outputs() -> None:
    result = run_quick("prefix", TIMEOUT_S)

    assert result["outputs_equal"] is True
    assert result["hit_rate"] == 1.0 and result["tier_rounds_hit_rate"] == 1.0
    turns = result["conversations"]
    assert turns["requests"] == 6 and turns["cached_tokens"] == turns["reusable_tokens"] > 0
    assert turns["routes"].get("peer_hit", 0) >= 1  # turns alternate instances
    full_blocks = (256 + 21) // 16 * 16  # --quick: 256-token contexts, 21-token turns
    assert result["cached_tokens"] == {
        "recompute": [0],
        **{kind: [full_blocks] for kind in KINDS[1:]},
    }
    assert result["routes"]["peer_hit"] == ["peer_hit"]
    assert result["kv_sources"]["peer_hit"] == ["A"]  # read from A: C has no G4
    for kind in ("recompute", "device_hit", "host_hit", "disk_hit"):
        assert result["routes"][kind] == ["local"], kind
        assert result["kv_sources"][kind] == [""], kind
    assert set(result["ttft_ms"]) == set(KINDS)
    assert all(v > 0 for v in result["ttft_ms"].values())
    assert set(result["speedup_vs_recompute"]) == set(KINDS[1:])
    assert set(result["goals"]) == {"host_hit", "peer_hit", "disk_hit"}
