"""``python -m fabric.bench serve --quick`` end to end: JSON shape and equal outputs, no timings.

Starts real etcd, an aggregated deployment and a 1P1D one (NIXL reads) on the tiny model; the
benchmark stops every process itself, and this test stops the benchmark (SIGTERM, which it turns
into a clean shutdown, then SIGKILL) if it overruns.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

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


def _run_quick() -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "fabric.bench", "serve", "--quick"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its children on SIGTERM
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"serve --quick took over {TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def test_serve_bench_quick() -> None:
    code, out, err = _run_quick()
    assert code == 0, err[-3000:]
    result = json.loads(out)
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
