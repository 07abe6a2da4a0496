"""``python -m fabric.bench router-scale --quick`` end to end: the JSON's keys, and the router
picks, in the simulated fleet, the worker holding each prompt's longest device/host prefix (a
longer disk-only copy elsewhere notwithstanding); no timings.

The benchmark runs in its own session; on overrun the test kills the whole group (the benchmark
and its two child processes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

TIMEOUT_S = 180.0
ROW_KEYS = {
    "workers",
    "cached_blocks",
    "prompt_tokens",
    "ingest_blocks_per_s",
    "bytes_per_block",
    "route_ms_p50",
    "route_ms_p99",
}


def test_router_scale_quick_routes_to_the_longest_prefix() -> None:
    cmd = [sys.executable, "-m", "fabric.bench", "router-scale", "--quick"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"router-scale --quick took over {TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)
    rows = result["rows"]
    assert [(row["workers"], row["prompt_tokens"]) for row in rows] == [
        (4, 2048),
        (4, 2048),
        (16, 2048),
        (16, 2048),
    ]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["ingest_blocks_per_s"] > 0
        assert row["bytes_per_block"] > 0
        assert 0 < row["route_ms_p50"] <= row["route_ms_p99"]
    for small, large in (rows[0:2], rows[2:4]):  # the second stage indexes more blocks
        assert 4_000 <= small["cached_blocks"] < 16_000 <= large["cached_blocks"]
    checks = result["checks"]
    assert checks["routes"] == 2 * 2 * 6 * 4  # fleets x stages x prompts x repeats
    assert checks["longest_prefix_picked"] == checks["routes"]
    assert set(result["goals"]) == {
        "ingest_blocks_per_s",
        "bytes_per_block",
        "route_ms_p99_at_16_workers",
    }
