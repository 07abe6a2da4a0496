"""``python -m fabric.bench load`` end to end at its smallest setting: JSON keys and requests
served by every deployment; never timings.

Runs the real benchmark: a private etcd, the ``1p1d`` and ``agg_2t`` deployments of the tiny
preset (started as ``fabric launch`` starts them), vLLM's own serving benchmark client from
``.venv-vllm`` (set up by ``launch/setup_vllm.sh`` when missing) at one rate with a handful of
prompts, then the TTFT-overhead probes on a fresh ``1p1d``. The benchmark stops its processes
itself; this test stops the benchmark (SIGTERM, which it turns into a clean shutdown, then
SIGKILL) if it overruns.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric.bench.load.report import ROW_KEYS

pytestmark = [pytest.mark.slow, pytest.mark.etcd, pytest.mark.nixl]

BENCH_TIMEOUT_S = 900.0
"""Two small deployments and three client runs take about a minute; the rest is margin for a
busy machine and for setting up .venv-vllm when it is missing."""
NUM_PROMPTS = 6
SUMMARY_KEYS = (
    "pd_goodput_vs_best_agg",
    "pd_itl_p99_vs_best_agg",
    "fabric_pd_goodput_vs_nixl_pd",
    "pd_ttft_overhead_ms",
    "goals",
    "reasons",
)


def _run_bench(json_out: Path, plot: Path) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "fabric.bench", "load", "--preset", "tiny"]
    cmd += ["--deployments", "1p1d,agg_2t", "--rates", "2", "--num-prompts", str(NUM_PROMPTS)]
    cmd += ["--input-len", "512", "--output-len", "8"]
    cmd += ["--overhead-preset", "tiny", "--overhead-tokens", "512", "--overhead-probes", "2"]
    cmd += ["--json-out", str(json_out), "--plot", str(plot)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its processes on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench load took over {BENCH_TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(BENCH_TIMEOUT_S + 120)
def test_load_bench_smallest_setting(tmp_path: Path) -> None:
    json_out, plot = tmp_path / "load.json", tmp_path / "load.svg"
    code, out, err = _run_bench(json_out, plot)
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert json.loads(json_out.read_text()) == result
    assert {"rows", "summary", "workload", "deployments", "machine"} <= set(result)
    assert set(result["deployments"]) == {"1p1d", "agg_2t"}
    assert result["workload"]["rates"] == [2.0]
    assert result["machine"]["loadavg_before"] and result["machine"]["loadavg_after"]
    assert not Path(result["machine"]["run_dir"]).exists()  # the temporary directory is gone

    rows = result["rows"]
    assert [(r["deployment"], r["rate"]) for r in rows] == [("1p1d", 2.0), ("agg_2t", 2.0)]
    for row in rows:
        assert tuple(row) == ROW_KEYS, row
        assert row["error"] is None, row["error"]
        assert row["num_prompts"] == NUM_PROMPTS
        assert row["completed"] > 0 and row["completed"] + row["failed"] == NUM_PROMPTS, row
        assert row["refused"] >= 0
        for key in ("request_throughput", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50"):
            assert _positive(row[key]), (key, row)
        assert row["goodput"] >= 0 and 0 <= row["slo_attainment"] <= 1
        assert isinstance(row["meets_slo"], bool)

    summary = result["summary"]
    assert set(SUMMARY_KEYS) <= set(summary)
    for key in SUMMARY_KEYS[:4]:
        value = summary[key]
        assert value is None or _positive(value), (key, value)
        assert (value is None) == (key in summary["reasons"]), (key, summary["reasons"])
    assert summary["fabric_pd_goodput_vs_nixl_pd"] is None  # no vLLM deployment was run
    assert summary["pd_ttft_overhead"]["prompt_tokens"] == 512
    assert len(summary["pd_ttft_overhead"]["ttft_ms"]) == 2
    assert plot.read_text().startswith("<svg")
