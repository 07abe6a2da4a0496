"""``python -m fabric.bench serve --quick`` end to end: JSON shape and equal outputs, no timings.

Starts real etcd, an aggregated deployment and a 1P1D one (NIXL reads) on the tiny model; the
benchmark stops every process itself, and this test stops the benchmark (SIGTERM, which it turns
into a clean shutdown, then SIGKILL) if it overruns.
"""

from __future__ import annotations

import math

import pytest
from bench_quick import run_quick

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.nixl,
]

TIMEOUT_S = 90.0
POSITIVE = (
    "ttft_ms_p50",
    "ttft_overhead_ms_p50",
    "itl_ms_p50",
    "tokens_per_s",
    "prefill_ms_p50",
    "completion_tokens",
)


def test_serve_bench_quick() -> None:
    result = run_quick("serve", TIMEOUT_S)
    rows = result["rows"]
    lengths = result["params"]["prompt_tokens"]
    assert len(lengths) >= 1
    assert {(r["mode"], r["prompt_tokens"]) for r in rows} == {
        (mode, n) for mode in ("aggregated", "disaggregated") for n in lengths
    }
    for row in rows:
        assert row["preset"] == "tiny"
        assert row["num_requests"] == result["params"]["requests"] >= 1
        for key in POSITIVE:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["cached_tokens_max"] == 0, row  # distinct prompts: nothing served from cache
        if row["mode"] == "aggregated":
            assert row["kv_transfer_ms_p50"] is None, row
            assert row["outputs_equal"] is None, row
        else:
            transfer = row["kv_transfer_ms_p50"]
            assert math.isfinite(transfer) and transfer > 0, row
            assert row["outputs_equal"] is True, row
    ratios = result["ratios"]
    assert {(r["mode"], r["prompt_tokens"]) for r in ratios} == {
        ("disaggregated", n) for n in lengths
    }
    for ratio in ratios:
        for key in ("ttft", "itl"):
            assert math.isfinite(ratio[key]) and ratio[key] > 0, ratio
