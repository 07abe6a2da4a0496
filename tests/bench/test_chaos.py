"""``python -m fabric.bench chaos --quick`` end to end: the rows' keys and the issue's goals.

Runs every fault against real processes (etcd, a 1P1D on the tiny model with NIXL reads, the
frontend, an aggregated reference); the benchmark stops every process itself, and this test
stops the benchmark (SIGTERM, which it turns into a clean shutdown, then SIGKILL) if it overruns.
Logs and etcd data go to ``tmp_path``, removed by pytest. Goals (issue 15): no request hangs, no
served text differs from the reference, no block or hold is left once the deployment is idle,
the deleted record is back within one keepalive, a paused etcd fails no request, the burst's
refusals are quick, every malformed request is a 4xx JSON and the prefill serves P/D again.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.bench.chaos import FAULT_NAMES
from fabric.bench.chaos.context import ROW_KEYS
from fabric.bench.chaos.malformed import http_cases
from fabric.bench.chaos.process_faults import PD_CHECKS

# In the default suite, as issue 15 asks of the short version: 91 s alone on 2 cores (191 s
# beside another benchmark), about a fifth of that suite.
pytestmark = [pytest.mark.etcd, pytest.mark.nixl]

TIMEOUT_S = 240.0
KEEPALIVE_S = 5.0 / 3  # the default registration TTL over 3


def _run_quick(run_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "fabric.bench", "chaos", "--quick", "--run-dir", str(run_dir)]
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
        pytest.fail(f"chaos --quick took over {TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    result: dict[str, Any] = json.loads(out)
    return result


def test_chaos_quick(tmp_path: Path) -> None:
    result = _run_quick(tmp_path)
    rows = {row["fault"]: row for row in result["rows"]}
    assert list(rows) == list(FAULT_NAMES)
    for name, row in rows.items():
        assert tuple(row) == ROW_KEYS, name
        assert row["hung"] == 0, row
        assert row["wrong_outputs"] == 0, row
        assert row["leaked_blocks"] == 0, row
        assert row["leaked_holds"] == 0, row
        assert row["ok"] >= 1, row
        assert isinstance(row["notes"], str)
    for name in ("kill_prefill", "kill_decode", "etcd_pause", "etcd_kill", "same_id_restart"):
        assert rows[name]["recovery_s"] is not None, rows[name]
    assert rows["etcd_pause"]["failed_clearly"] == 0, rows["etcd_pause"]
    assert rows["kill_prefill"]["wrong_outputs"] == 0
    deleted = rows["registration_deleted"]
    assert deleted["recovery_s"] is not None and deleted["recovery_s"] <= KEEPALIVE_S + 1.0
    assert rows["same_id_restart"]["ok"] == 1 + PD_CHECKS, rows["same_id_restart"]
    assert "0 over 2 s" in rows["burst"]["notes"], rows["burst"]
    malformed = rows["malformed_http"]
    assert malformed["failed_clearly"] == len(http_cases("m", 1)), malformed
    assert rows["malformed_wire"]["ok"] == 2, rows["malformed_wire"]
